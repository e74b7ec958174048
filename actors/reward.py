"""Reward pool: the judge VLM scoring GRPO-A rollouts.

For each plan: Rf from the plan's format (``aesformer.rewards.format_score``,
strict or as released), Ra (alignment with the reference plan, text only) and
Rc (creativity: the photo and the plan) as the judge's expected score over the
six score tokens at the first generated position
(``aesformer.rewards.expected_score``), read through the engine's
``score_tokens`` — vLLM with ``max_tokens=1`` and the log-probs of exactly
those ids, transformers from one batched forward pass. The prompts, the plan
text the judge reads and the photo's size come from ``judging`` (see
:func:`aesformer.rewards.alignment_request` and ``creativity_request``).
``alignment="rule"`` replaces the judge's Ra by ``rule_alignment``. The judge
is loaded only when some weighted component needs it.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import ray

from aesformer.cluster import use_worker_threads
from aesformer.rewards import ALIGNMENT_MODES, needs_judge

@ray.remote
class RewardWorker:
    def __init__(self, engine_kind: str, judge_path: Optional[str], options: Optional[dict],
                 weights: Sequence[float], alignment: str = "judge", judging: Optional[dict] = None):
        """``judging``: ``prompts`` (a prompt set as plain data or a name/path;
        None: the default set), ``judge_text`` (plain | tagged),
        ``image_max_side`` and ``format`` (strict | headers)."""
        from aesformer.rewards import load_prompts

        if alignment not in ALIGNMENT_MODES:
            raise ValueError(f"reward alignment must be one of {ALIGNMENT_MODES}, got '{alignment}'")
        judging = dict(judging or {})
        self.prompts = load_prompts(judging.get("prompts"))
        self.judge_text = judging.get("judge_text", "plain")
        self.image_max_side = judging.get("image_max_side", 512)
        self.format = judging.get("format", "strict")
        self.weights = tuple(float(w) for w in weights)
        self.alignment = alignment
        self.judge = None
        self.score_ids: list[int] = []
        if needs_judge(self.weights, alignment):  # else no model, not even torch, is loaded
            from aesformer.actors.rollout import engine_options
            from aesformer.engines import make_engine, resolve_engine_kind
            from aesformer.models import score_token_ids

            if not judge_path:
                raise ValueError("the reward weights need the judge, but no judge model is configured (models.judge)")
            kind = resolve_engine_kind(engine_kind)
            use_worker_threads()
            self.judge = make_engine(kind, judge_path, **engine_options(kind, options))
            self.score_ids = score_token_ids(self.judge.tokenizer())

    def pid(self) -> int:
        return os.getpid()

    def score(self, items: Sequence[dict]) -> dict[str, list[float]]:
        """``items``: dicts with ``text`` (the plan), ``reference`` (the
        reference plan text) and ``image`` (the poor photo: PIL, or its
        object-store reference). Returns
        lists ``rf``, ``ra``, ``rc`` and the weighted ``reward``."""
        from aesformer.rewards import (alignment_request, combine, creativity_request, expected_score, format_score,
                                       rule_alignment)

        wf, wa, wc = self.weights
        n = len(items)
        rf = [format_score(it["text"], self.format) for it in items]
        ra = [0.0] * n
        rc = [0.0] * n
        if wa != 0:
            if self.alignment == "rule":
                ra = [rule_alignment(it["text"], it["reference"]) for it in items]
            else:
                requests = [alignment_request(self.prompts, it["text"], it["reference"], self.judge_text) for it in items]
                ra = [float(x) for x in expected_score(self.judge.score_tokens(requests, self.score_ids))]
        if wc != 0:
            from aesformer.actors.images import resolve_items

            from aesformer.rewards import shrink_image

            items = resolve_items(items)  # the photos arrive as object-store references
            # each photo shrunk once for its group: the same image object lets the judge run the
            # plans' common opening (photo and instructions) once
            shrunk: dict[int, object] = {}
            for it in items:
                if id(it["image"]) not in shrunk:
                    shrunk[id(it["image"])] = shrink_image(it["image"], self.image_max_side)
            requests = [creativity_request(self.prompts, it["text"], shrunk[id(it["image"])], self.judge_text, None)
                        for it in items]
            rc = [float(x) for x in expected_score(self.judge.score_tokens(requests, self.score_ids))]
        reward = [float(combine(f, a, c, self.weights)) for f, a, c in zip(rf, ra, rc)]
        return {"rf": rf, "ra": ra, "rc": rc, "reward": reward}

"""Reward pool: the judge VLM scoring GRPO-A rollouts.

For each plan: Rf from the plan's format (``aesformer.actions.format_reward``),
Ra (alignment with the reference plan, text only) and Rc (creativity: the
photo and the plan) as the judge's expected score over the six score tokens
at the first generated position (``aesformer.rewards.expected_score``), read
through the engine's ``score_tokens`` — vLLM with ``max_tokens=1`` and the
log-probs of exactly those ids, transformers from one batched forward pass.
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
                 weights: Sequence[float], alignment: str = "judge"):
        if alignment not in ALIGNMENT_MODES:
            raise ValueError(f"reward alignment must be one of {ALIGNMENT_MODES}, got '{alignment}'")
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
        reference plan text) and ``image`` (the poor photo, PIL). Returns
        lists ``rf``, ``ra``, ``rc`` and the weighted ``reward``."""
        from aesformer.actions import format_reward
        from aesformer.rewards import alignment_prompt, combine, creativity_prompt, expected_score, judge_messages, rule_alignment

        wf, wa, wc = self.weights
        n = len(items)
        rf = [format_reward(it["text"]) for it in items]
        ra = [0.0] * n
        rc = [0.0] * n
        if wa != 0:
            if self.alignment == "rule":
                ra = [rule_alignment(it["text"], it["reference"]) for it in items]
            else:
                requests = [{"text": alignment_prompt(it["text"], it["reference"])} for it in items]
                ra = [float(x) for x in expected_score(self.judge.score_tokens(requests, self.score_ids))]
        if wc != 0:
            requests = [{"messages": judge_messages(creativity_prompt(it["text"]), it["image"])} for it in items]
            rc = [float(x) for x in expected_score(self.judge.score_tokens(requests, self.score_ids))]
        reward = [float(combine(f, a, c, self.weights)) for f, a, c in zip(rf, ra, rc)]
        return {"rf": rf, "ra": ra, "rc": rc, "reward": reward}

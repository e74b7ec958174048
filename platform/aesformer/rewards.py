"""GRPO-A rewards: the judge's expected score, the weighted sum, the two
judge prompts, and a cheap rule-based alignment score.

The judge (a VLM) is asked for a single digit 0–5; the reward is not the
digit it samples but the expectation under its distribution over the six
digit tokens at the first generated position, divided by 5 so it lies in
[0, 1]. Prompts put the fixed rubric first and the variable part (plans,
photo) last, so an inference engine's prefix cache can reuse the rubric
across every request of a batch.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Optional, Sequence, Union

from aesformer.actions import DIMENSIONS, ActionPlan, extract_dimensions

SCORE_TOKENS: tuple[str, ...] = ("0", "1", "2", "3", "4", "5")
MAX_SCORE = len(SCORE_TOKENS) - 1
DEFAULT_WEIGHTS: tuple[float, float, float] = (0.1, 0.5, 0.4)  # λf, λa, λc

PlanLike = Union[ActionPlan, str]

# Ra from the judge, or from rule_alignment (no model)
ALIGNMENT_MODES: tuple[str, ...] = ("judge", "rule")


def needs_judge(weights: Sequence[float], alignment: str) -> bool:
    """Whether the weighted reward reads any score from the judge model."""
    return (weights[1] != 0 and alignment == "judge") or weights[2] != 0


# -- scores ----------------------------------------------------------------------

def expected_score(logits: Any) -> Any:
    """E[score]/5 from logits (or log-probabilities) of the tokens "0".."5".

    ``logits`` has shape [..., 6]; the result has shape [...] with values in
    [0, 1]. A torch tensor gives a float32 tensor (differentiable); numpy
    arrays and nested lists give a numpy array, or a float for one vector.
    Uniform logits give 0.5.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(logits, torch.Tensor):
        if logits.shape[-1] != len(SCORE_TOKENS):
            raise ValueError(f"expected_score wants the last dimension to be {len(SCORE_TOKENS)}, got shape {tuple(logits.shape)}")
        probs = torch.softmax(logits.float(), dim=-1)
        values = torch.arange(len(SCORE_TOKENS), dtype=probs.dtype, device=probs.device)
        return (probs * values).sum(-1) / MAX_SCORE
    import numpy as np

    arr = np.asarray(logits, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[-1] != len(SCORE_TOKENS):
        raise ValueError(f"expected_score wants the last dimension to be {len(SCORE_TOKENS)}, got shape {arr.shape}")
    shifted = arr - arr.max(axis=-1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = (probs * np.arange(len(SCORE_TOKENS))).sum(-1) / MAX_SCORE
    return float(out) if out.ndim == 0 else out


def combine(rf: Any, ra: Any, rc: Any, weights: Sequence[float] = DEFAULT_WEIGHTS) -> Any:
    """r = λf·Rf + λa·Ra + λc·Rc; works on floats, numpy arrays and tensors."""
    if len(weights) != 3:
        raise ValueError(f"combine wants three weights (format, alignment, creativity), got {weights!r}")
    wf, wa, wc = weights
    return wf * rf + wa * ra + wc * rc


# -- judge prompts -------------------------------------------------------------------

ANSWER_INSTRUCTION = "Reply with a single digit from 0 to 5 and nothing else."

ALIGNMENT_RUBRIC = (
    "You compare two photo-editing plans written for the same photo. Each plan lists changes along seven "
    "photographic dimensions: aspect ratio, framing and composition, camera position and viewpoint, subject "
    "position, subject pose, depth of field and focus, colour and lighting.\n"
    "The REFERENCE plan describes the change that really improved the photo. Judge whether the CANDIDATE plan "
    "carries the same editing intent and the same key operations (the same crop or ratio change, the same "
    "shift of viewpoint, the same move of the subject, the same pose change, and so on). Wording does not "
    "matter; meaning does. Missing a key operation, or asking for the opposite, costs the most.\n"
    "Scale:\n"
    "5 - same intent and every key operation matches\n"
    "4 - same intent, one minor operation differs or is missing\n"
    "3 - mostly the same intent, one key operation differs or is missing\n"
    "2 - partly overlapping, several key operations differ\n"
    "1 - little in common with the reference\n"
    "0 - unrelated or contradicting the reference, or not a plan at all\n"
)

CREATIVITY_RUBRIC = (
    "You review a photo-editing plan written for the photo shown below. The plan should reshape how the photo "
    "was taken so that it looks clearly better, while keeping the same subject and the same scene.\n"
    "A good plan is specific (says what to change and by how much), executable (an editor could carry it "
    "out on this photo), and structural: it changes the crop or composition, the camera viewpoint, the "
    "subject's placement or the subject's pose, and it is likely to produce a visible improvement.\n"
    "Rules:\n"
    "- A generic plan, a plan that only adjusts colour, light or filters, or an overly cautious plan that "
    "barely changes anything scores at most 2.\n"
    "- A plan that introduces or assumes anything not present in the photo (new people, objects, props, "
    "scenery or details the photo does not show) scores 0.\n"
    "Scale:\n"
    "5 - specific, executable, structural and likely to give a large visible gain\n"
    "4 - specific and structural, a clear gain\n"
    "3 - structural but vague, or a modest gain\n"
    "2 - generic, colour-only or overly conservative\n"
    "1 - barely actionable\n"
    "0 - introduces or assumes things not in the photo, or is not a plan\n"
)


def _plan_text(plan: PlanLike) -> str:
    if isinstance(plan, ActionPlan):
        return plan.render()
    return str(plan).strip()


def alignment_prompt(plan: PlanLike, reference: PlanLike) -> str:
    """Text-only judge prompt: rubric, then the reference and candidate plans,
    then the request for one digit."""
    return (
        f"{ALIGNMENT_RUBRIC}\n"
        f"REFERENCE plan:\n{_plan_text(reference)}\n\n"
        f"CANDIDATE plan:\n{_plan_text(plan)}\n\n"
        f"How well does the candidate match the reference (0-5)? {ANSWER_INSTRUCTION}"
    )


def creativity_prompt(plan: PlanLike) -> list[dict]:
    """Chat content parts for the creativity judge: the rubric, the photo,
    then the plan and the request for one digit::

        [{"type": "text", "text": CREATIVITY_RUBRIC},
         {"type": "image"},
         {"type": "text", "text": "Plan: ... Reply with a single digit ..."}]

    The ``{"type": "image"}`` part is where the photo goes: add
    ``"image": <PIL image or path>`` to that dict, or keep it as a
    placeholder and hand the image to the processor (HF chat templates turn
    it into the model's image tokens). Wrap it as
    ``[{"role": "user", "content": parts}]`` (see :func:`judge_messages`).
    """
    return [
        {"type": "text", "text": CREATIVITY_RUBRIC + "\nPhoto:"},
        {"type": "image"},
        {"type": "text", "text": f"Plan:\n{_plan_text(plan)}\n\nHow good is this plan for this photo (0-5)? {ANSWER_INSTRUCTION}"},
    ]


def judge_messages(content: Union[str, list[dict]], image: Any = None) -> list[dict]:
    """A one-turn user chat around a prompt from :func:`alignment_prompt` or
    :func:`creativity_prompt`; ``image``, if given, is attached to the image part."""
    if isinstance(content, str):
        parts: list[dict] = [{"type": "text", "text": content}]
    else:
        parts = [dict(p) for p in content]
        if image is not None:
            for p in parts:
                if p.get("type") == "image":
                    p["image"] = image
    return [{"role": "user", "content": parts}]


# -- rule-based alignment ------------------------------------------------------------

_WORD_RE = re.compile(r"[a-z0-9]+(?::[0-9]+)?")


def _tokens(text: Optional[str]) -> Counter:
    return Counter(_WORD_RE.findall((text or "").lower()))


def _dimension_texts(plan: PlanLike) -> dict[str, Optional[str]]:
    # a plan that parses gives the same texts through extract_dimensions, so no parse first
    return plan.to_dict() if isinstance(plan, ActionPlan) else extract_dimensions(str(plan))


def _f1(a: Counter, b: Counter) -> float:
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    overlap = sum((a & b).values())
    return 2.0 * overlap / (sum(a.values()) + sum(b.values()))


def rule_alignment(plan: PlanLike, reference: PlanLike) -> float:
    """Token-overlap F1 per dimension (lower-cased words, headers excluded),
    averaged over the seven dimensions; in [0, 1].

    A cheap stand-in for the alignment judge, for debugging and CPU tests.
    Text that does not parse is read dimension by dimension as far as
    possible; a dimension that cannot be found in the candidate scores 0.
    """
    cand, ref = _dimension_texts(plan), _dimension_texts(reference)
    total = 0.0
    for d in DIMENSIONS:
        if cand.get(d.key) is None:
            continue  # missing in the candidate: 0 for this dimension
        total += _f1(_tokens(cand[d.key]), _tokens(ref.get(d.key)))
    return total / len(DIMENSIONS)

"""The pairwise judge: prompt, A/B order, verdict parsing.

Each comparison shows the judge two photos of the same scene, image A and
image B: a system's output and a reference (the poor or the good photo).
Which one is A is drawn at random per comparison (reproducibly, from the
comparison's key and the job seed); on a configurable share of comparisons
both orders are asked, which measures the judge's position bias and cancels
it in the win rate.

The judge answers in JSON, ``{"winner": "A" | "B" | "tie", "reason": ...}``;
:func:`parse_verdict` also reads a bare ``A``/``B``/``tie`` and says ``None``
for anything else (stored as a failure with the raw reply). A local VLM
judge is read instead from its first-token probabilities over ``A``, ``B``
and ``T`` (tie): a verdict without sampling, as the GRPO reward reads its judge.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Optional

OUTPUT_FIRST, REFERENCE_FIRST = "output_first", "reference_first"
ORDERS = (OUTPUT_FIRST, REFERENCE_FIRST)
LOCAL_CANDIDATES = {"A": "A", "B": "B", "T": "tie"}  # first-token reading of a local judge

JUDGE_PROMPT = (
    "You are an expert photography judge. Below are two photos of the same scene and subject, image A and "
    "image B. Decide which one is the better photograph: composition and framing, camera viewpoint, subject "
    "placement and pose, focus, colour and light, and overall aesthetic appeal. Ignore the image size and "
    "file quality differences that come from resizing. If neither is better, answer tie.\n"
    'Answer with JSON only: {"winner": "A" or "B" or "tie", "reason": "<one sentence>"}'
)


def comparison_key(system: str, photo: str, seed: int, reference: str) -> str:
    """The identity of one comparison (output of ``system`` on ``photo``
    with ``seed`` against the ``reference`` photo, "poor" or "good")."""
    return f"{system}|{photo}|{seed}|{reference}"


def _unit(key: str, salt: str, job_seed: int) -> float:
    h = hashlib.sha256(f"{salt}|{job_seed}|{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64


def orders_for(key: str, *, job_seed: int, both_orders: float) -> list[str]:
    """The A/B orders to ask for one comparison: both on a ``both_orders``
    share of comparisons, else one drawn at random; reproducible per key."""
    if _unit(key, "both", job_seed) < both_orders:
        return list(ORDERS)
    return [OUTPUT_FIRST if _unit(key, "order", job_seed) < 0.5 else REFERENCE_FIRST]


def conversation(image_a: Any, image_b: Any, prompt: str = JUDGE_PROMPT) -> list[dict]:
    """The chat (engine message format) that asks for one verdict."""
    return [{"role": "user", "content": [
        {"type": "text", "text": prompt + "\nImage A:"}, {"type": "image", "image": image_a},
        {"type": "text", "text": "Image B:"}, {"type": "image", "image": image_b},
        {"type": "text", "text": "Which is the better photograph?"}]}]


_JSON_RE = re.compile(r"\{.*?\}", re.S)
_BARE_RE = re.compile(r"^\W*(?:image\s+)?(A|B|tie)\W*$", re.I)


def parse_verdict(text: Optional[str]) -> Optional[str]:
    """``"A"``, ``"B"``, ``"tie"``, or ``None`` when the reply holds no verdict."""
    if not text:
        return None
    for m in _JSON_RE.finditer(text):
        try:
            obj = json.loads(m.group(0))
        except ValueError:
            continue
        if isinstance(obj, dict):
            w = str(obj.get("winner", "")).strip()
            if w.upper() in ("A", "B"):
                return w.upper()
            if w.lower() in ("tie", "equal", "draw", "none"):
                return "tie"
    m = _BARE_RE.match(text.strip())
    if m:
        return "tie" if m.group(1).lower() == "tie" else m.group(1).upper()
    return None


def verdict_from_logprobs(logprobs: dict[str, float]) -> str:
    """A local judge's verdict: the most likely of ``A``, ``B``, ``T`` (tie)."""
    best = max(LOCAL_CANDIDATES, key=lambda c: logprobs.get(c, float("-inf")))
    return LOCAL_CANDIDATES[best]


def outcome(verdict: Optional[str], order: str) -> Optional[str]:
    """The system's outcome ("win", "tie", "loss") from a verdict and the order shown."""
    if verdict is None:
        return None
    if verdict == "tie":
        return "tie"
    output_letter = "A" if order == OUTPUT_FIRST else "B"
    return "win" if verdict == output_letter else "loss"

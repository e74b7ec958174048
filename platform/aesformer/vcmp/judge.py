"""The questions VCMP asks a VLM judge, and how an answer is read.

Every judgment is a single digit 0–5 read from the judge's first-token
log-probs of the six digit tokens (``engine.score_tokens``), as the GRPO
reward reads its judge: P = E[score]/5 in [0, 1]. The rubric comes first
and the images last in the prompt, so an engine's prefix cache reuses it.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from aesformer.rewards import ANSWER_INSTRUCTION, expected_score

QUESTIONS = {
    # stage 2: is the video a photography tutorial (a few frames of it)
    "tutorial": ("These frames come from one video. Is it a photography tutorial that shows how to take a better "
                 "photo, rather than an advert or a showcase of finished photos? 0 means certainly not, "
                 "5 certainly yes."),
    # stage 5: is the frame a clean final photo
    "good_frame": ("Is this video frame a clean, photo-like final result: a finished photograph with no "
                   "subtitles, camera interface, grid lines or transition effect on it? 0 means certainly not, "
                   "5 certainly yes."),
    # stage 7: blur and ghosting
    "sharp": ("Is this photo sharp and clean, without motion blur, defocus or ghosting (double images)? "
              "0 means badly blurred or ghosted, 5 perfectly sharp."),
    # stage 8: did the overlay removal work
    "clean": ("Is this image free of subtitles, text, camera app interface and grid lines, with the photo "
              "itself unchanged? 0 means overlays remain or the photo is damaged, 5 perfectly clean."),
    # stage 9: strict alignment of a pair
    "aligned": ("The first image is a badly framed shot, the second a well framed shot. Do they show the same "
                "person or subject, in the same scene, at the same event, with nothing new added in the "
                "second? 0 means certainly not, 5 certainly yes."),
}


def judge_request(kind: str, images: Sequence[Any]) -> dict:
    """An engine request asking question ``kind`` about ``images``."""
    if kind not in QUESTIONS:
        raise KeyError(f"unknown judge question '{kind}'; known: {', '.join(QUESTIONS)}")
    return {"images": list(images), "text": f"{QUESTIONS[kind]} {ANSWER_INSTRUCTION}"}


def judge_probabilities(engine: Any, kind: str, image_sets: Sequence[Sequence[Any]],
                        digit_ids: Sequence[int]) -> np.ndarray:
    """P(yes) = E[score]/5 for each set of images (one request each)."""
    if not image_sets:
        return np.zeros(0)
    logp = engine.score_tokens([judge_request(kind, imgs) for imgs in image_sets], list(digit_ids))
    return np.asarray(expected_score(logp).detach().cpu().numpy() if hasattr(logp, "detach") else
                      expected_score(logp), dtype=float).reshape(-1)

"""Stage 8, overlay removal: verification of an edit, and the attempt log.

The editor (``aesformer.editor``) is asked to remove subtitles, UI and grid
lines from the poor frame; each attempt is verified by three readings:

- the judge's P(clean) ("clean" question, :mod:`.judge`),
- the cheap overlay detector (:func:`aesformer.vcmp.prefilter.overlay_score`),
- *fidelity*: the structural similarity of the edit to the original inside
  the scene rows (between the UI bar and the subtitle band), so an edit
  that repaints the photo fails even if it is clean.

An edit passes when all three clear their thresholds. Attempts are retried
with a new seed up to ``attempts`` times. When every attempt fails the pair
is dropped, or — with ``keep_original_on_failure`` (the tiny profile, whose
random tiny editor only ever paints noise) — keeps the original poor frame
and records that it did.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from aesformer.vcmp.prefilter import overlay_score


def fidelity(original: Any, edited: Any, rows: tuple[float, float] = (0.12, 0.78), width: int = 128) -> float:
    """SSIM (0..1, negatives clipped) of two images' grey scene rows at ``width``."""
    import cv2
    from skimage.metrics import structural_similarity

    a = np.asarray(original.convert("RGB"))
    b = np.asarray(edited.convert("RGB").resize(original.size))
    h = max(16, round(a.shape[0] * width / a.shape[1]))

    def prep(x):
        g = cv2.cvtColor(cv2.resize(x, (width, h), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
        return g[int(h * rows[0]):int(h * rows[1])]

    ga, gb = prep(a), prep(b)
    win = min(7, (min(ga.shape) // 2) * 2 - 1)
    if win < 3:
        return 0.0
    return float(max(0.0, structural_similarity(ga, gb, win_size=win, data_range=255)))


def verify_edit(original: Any, edited: Any, judge_p: float, judge_threshold: float, detector_max: float,
                fidelity_min: float) -> dict:
    """The readings of one attempt and whether it passes, with the reason."""
    det = float(overlay_score(np.asarray(edited.convert("RGB"))))
    fid = fidelity(original, edited)
    reasons = []
    if judge_p < judge_threshold:
        reasons.append(f"judge {judge_p:.2f} < {judge_threshold}")
    if det > detector_max:
        reasons.append(f"overlays left: detector {det:.2f} > {detector_max}")
    if fid < fidelity_min:
        reasons.append(f"photo changed: fidelity {fid:.2f} < {fidelity_min}")
    return {"judge": round(float(judge_p), 4), "detector": round(det, 4), "fidelity": round(fid, 4),
            "passed": not reasons, "reason": "; ".join(reasons) or "clean"}

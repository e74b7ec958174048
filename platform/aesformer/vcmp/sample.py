"""Stage 4, sampling: frames of a segment at ``fps`` by timestamp.

The segment is decoded forward from its start, one frame at a time; a frame
is kept when it is the first at or after the next sampling time
(start, start + 1/fps, …). Each kept frame also carries its *motion*: the
mean absolute change (0..1) from the decoded frame just before it, measured
on small grey copies — near 0 for a photo held still, larger for hand shake,
fades and blurs. Only the kept frames leave this function, one at a time.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from aesformer.vcmp.decode import iter_frames


def sample_times(start: float, end: float, fps: float) -> list[float]:
    """start, start + 1/fps, … strictly before end."""
    n = max(0, int(np.ceil((end - start) * fps - 1e-9)))
    return [round(start + k / fps, 6) for k in range(n)]


def _small_grey(arr: np.ndarray, width: int = 64) -> np.ndarray:
    import cv2

    h = max(2, round(arr.shape[0] * width / arr.shape[1]))
    g = cv2.cvtColor(cv2.resize(arr, (width, h), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
    return g.astype(np.float32) / 255.0


def sample_segment(path: str, start: float, end: float, fps: float = 2.0,
                   max_side: int = 0) -> Iterator[tuple[float, np.ndarray, Optional[float]]]:
    """(time, RGB frame, motion) for each sampling time of [start, end).

    ``motion`` is None for the first frame decoded (nothing before it).
    ``max_side`` > 0 downscales frames whose longest side is larger.
    """
    import cv2

    targets = sample_times(start, end, fps)
    if not targets:
        return
    k = 0
    prev: Optional[np.ndarray] = None
    # decode from one nominal frame before the start, so the first sample has a motion
    for t, arr in iter_frames(path, max(0.0, start - 0.2), end):
        grey = _small_grey(arr)
        motion = None if prev is None or prev.shape != grey.shape else float(np.abs(grey - prev).mean())
        prev = grey
        if t < start - 1e-6:
            continue
        if k < len(targets) and t >= targets[k] - 1e-3:
            if max_side and max(arr.shape[:2]) > max_side:
                s = max_side / max(arr.shape[:2])
                arr = cv2.resize(arr, (round(arr.shape[1] * s), round(arr.shape[0] * s)), interpolation=cv2.INTER_AREA)
            yield t, arr, motion
            while k < len(targets) and targets[k] <= t + 1e-3:
                k += 1
        if k >= len(targets):
            break

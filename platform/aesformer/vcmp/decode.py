"""Lazy frame decoding: frames stream one at a time, never all in memory.

Frames come upright (the stream's rotation metadata applied) as RGB uint8
arrays with their presentation time in seconds.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np


def upright(arr: np.ndarray, rotation: int) -> np.ndarray:
    """Apply a counter-clockwise display rotation (PyAV's ``frame.rotation``)."""
    k = (int(rotation) // 90) % 4
    return np.ascontiguousarray(np.rot90(arr, k=k)) if k else arr


def iter_frames(path: str, start: float = 0.0, end: Optional[float] = None,
                width: Optional[int] = None) -> Iterator[tuple[float, np.ndarray]]:
    """(time, RGB frame) for every decoded frame with start ≤ time < end.

    Seeks to the keyframe before ``start`` and decodes forward. ``width``
    scales frames (before rotation, so give it for the stored orientation
    via :func:`analysis_frames` when the aspect matters). A decode error
    mid-stream ends the iteration (the frames before it are kept).
    """
    import av

    container = av.open(str(path), metadata_errors="ignore")
    try:
        v = container.streams.video[0]
        v.thread_type = "AUTO"
        tb = float(v.time_base) if v.time_base else None
        fps = float(v.average_rate or v.guessed_rate or 25)
        if start > 0 and tb:
            container.seek(int(start / tb), stream=v, backward=True)
        index = 0
        try:
            for frame in container.decode(video=0):
                t = frame.time if frame.time is not None else index / fps
                index += 1
                if t < start - 1e-6:
                    continue
                if end is not None and t >= end - 1e-6:
                    break
                if width:
                    h = max(2, round(frame.height * width / frame.width))
                    arr = frame.to_ndarray(format="rgb24", width=int(width), height=int(h))
                else:
                    arr = frame.to_ndarray(format="rgb24")
                yield float(t), upright(arr, int(frame.rotation or 0))
        except (av.error.InvalidDataError, av.error.EOFError, ValueError):
            return
    finally:
        container.close()

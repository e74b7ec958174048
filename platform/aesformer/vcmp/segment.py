"""Stage 3, event segmentation: shots from frame differences, then merging.

Each decoded frame is reduced to a colour histogram (HSV, 8×4×4 bins) at a
small analysis width. A *cut* is a frame whose histogram distance to the
previous one is both large (``cut_threshold``) and a spike against the
median distance around it (``cut_ratio``): hand shake, slow fades and
blurs spread their change over many frames and stay below it. Adjacent
shots that keep the same subject and scene (mean histograms at least
``merge_similarity`` alike — a re-framing of the same scene keeps its
colours — or their last frames matching as one scene under a camera-like
transform, whatever overlays and crops changed) merge into one
shooting-event segment, and shots shorter than ``min_shot_s`` join their
more similar neighbour.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from aesformer.vcmp.decode import iter_frames


@dataclass
class Shot:
    start: float
    end: float
    hist: np.ndarray  # mean normalised histogram of its frames
    frames: int
    last: Optional[np.ndarray] = None  # its last frame (RGB, small), for the geometric scene match


def colour_hist(arr: np.ndarray, bins: tuple[int, int, int] = (8, 4, 4)) -> np.ndarray:
    """Normalised HSV histogram (sums to 1) of an RGB frame's scene: the
    rows between the top 12 % and the bottom 22 % (where camera UI and
    subtitles sit), without near-black pixels (letterbox bars, the dimmed
    band behind subtitles), so overlays and re-framing barely change it."""
    import cv2

    H = arr.shape[0]
    a = np.ascontiguousarray(arr[int(H * 0.12):max(int(H * 0.12) + 1, int(H * 0.78))])
    hsv = cv2.cvtColor(a, cv2.COLOR_RGB2HSV)
    mask = (hsv[..., 2] > 40).astype(np.uint8)
    if mask.sum() < 0.05 * mask.size:  # a dark frame: use every pixel
        mask = None
    h = cv2.calcHist([hsv], [0, 1, 2], mask, list(bins), [0, 180, 0, 256, 0, 256]).ravel()
    return h / max(1.0, float(h.sum()))


def hist_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Histogram intersection in [0, 1]."""
    return float(np.minimum(a, b).sum())


def find_cuts(distances: Sequence[float], threshold: float, ratio: float, window: int = 5) -> list[int]:
    """Indices i (frame i starts a new shot) where ``distances[i]`` (to frame
    i-1) exceeds ``threshold`` and ``ratio`` × the median of its neighbours."""
    d = np.asarray(distances, dtype=float)
    cuts = []
    for i in range(1, len(d)):
        lo, hi = max(1, i - window), min(len(d), i + window + 1)
        neigh = np.concatenate([d[lo:i], d[i + 1:hi]])
        base = float(np.median(neigh)) if len(neigh) else 0.0
        if d[i] > threshold and d[i] > ratio * max(base, 1e-3):
            cuts.append(i)
    return cuts


def shots_from_frames(frames: Iterable[tuple[float, np.ndarray]], threshold: float, ratio: float,
                      duration: Optional[float] = None, hist_width: int = 64) -> list[Shot]:
    """Shots of a stream of (time, small frame); keeps histograms (of the
    frame at ``hist_width``) and the frames that end a shot."""
    import cv2

    times, hists, arrs = [], [], []
    prev_hist = None
    for t, arr in frames:
        small = arr
        if arr.shape[1] > hist_width:
            small = cv2.resize(arr, (hist_width, max(2, round(arr.shape[0] * hist_width / arr.shape[1]))),
                               interpolation=cv2.INTER_AREA)
        h = colour_hist(small)
        if prev_hist is not None and 1.0 - hist_similarity(prev_hist, h) > threshold:
            arrs.append((len(times) - 1, last_arr))  # a possible shot end: keep the frame before it
        times.append(t)
        hists.append(h)
        prev_hist, last_arr = h, arr
    if not times:
        return []
    dist = [0.0] + [1.0 - hist_similarity(hists[i - 1], hists[i]) for i in range(1, len(hists))]
    bounds = [0] + find_cuts(dist, threshold, ratio) + [len(times)]
    end_time = duration if duration is not None else times[-1] + (times[-1] - times[-2] if len(times) > 1 else 0.1)
    ends = dict(arrs)
    ends[len(times) - 1] = last_arr
    shots = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        end = times[b] if b < len(times) else max(end_time, times[-1])
        shots.append(Shot(times[a], end, np.mean(hists[a:b], axis=0), b - a, ends.get(b - 1)))
    return shots


def same_scene(a: Optional[np.ndarray], b: Optional[np.ndarray], min_detail: float = 60.0) -> Optional[bool]:
    """Whether two frames show overlapping views of one scene (ORB + RANSAC,
    :mod:`aesformer.vcmp.align`): True for a re-framing of the same photo,
    whatever overlays and colours changed; False when both frames are
    detailed (see :func:`aesformer.vcmp.prefilter.detail`) and still do not
    match; None when that cannot be told (a blurred or dark frame)."""
    if a is None or b is None:
        return None
    from aesformer.vcmp.align import geometric_check, plausible_transform
    from aesformer.vcmp.prefilter import detail

    g = geometric_check(a, b, n_features=500, match_side=max(a.shape[:2]))
    if plausible_transform(g, min_inliers=10, min_inlier_ratio=0.3, min_overlap=0.2)[0]:
        return True
    return False if min(detail(a), detail(b)) >= min_detail else None


def merge_shots(shots: Sequence[Shot], merge_similarity: float, min_shot_s: float,
                geometric: bool = True) -> list[Shot]:
    """Merge adjacent shots of the same scene, fold short shots into their
    more similar neighbour, and merge once more across what was folded.
    With ``geometric``, shots whose last frames are a re-framing of one
    scene merge (a cut or a fade from the poor view to the result), two
    detailed frames of different scenes never do, and colours decide the
    rest; without it, colours decide."""
    def join(a: Shot, b: Shot) -> Shot:
        n = a.frames + b.frames
        last = b.last if b.end - b.start >= min_shot_s or a.last is None else a.last  # a short shot: a fade's black
        return Shot(a.start, b.end, (a.hist * a.frames + b.hist * b.frames) / max(1, n), n, last)

    def merge_pass(shots: Sequence[Shot]) -> list[Shot]:
        out: list[Shot] = []
        for s in shots:
            scene = same_scene(out[-1].last, s.last) if out and geometric else None
            if out and (scene or (scene is None and hist_similarity(out[-1].hist, s.hist) >= merge_similarity)):
                out[-1] = join(out[-1], s)
            else:
                out.append(s)
        return out

    out = merge_pass(shots)
    changed = True
    while changed and len(out) > 1:
        changed = False
        for i, s in enumerate(out):
            if s.end - s.start >= min_shot_s:
                continue
            left = hist_similarity(out[i - 1].hist, s.hist) if i > 0 else -1.0
            right = hist_similarity(out[i + 1].hist, s.hist) if i + 1 < len(out) else -1.0
            if left >= right:
                out[i - 1:i + 1] = [join(out[i - 1], s)]
            else:
                out[i:i + 2] = [join(s, out[i + 1])]
            changed = True
            break
    return merge_pass(out)


def segment_video(path: str, duration: Optional[float] = None, *, analysis_width: int = 64,
                  cut_threshold: float = 0.35, cut_ratio: float = 4.0, merge_similarity: float = 0.45,
                  min_shot_s: float = 0.6, match_width: int = 192) -> list[dict]:
    """Shooting-event segments of a video: [{start, end, shots}], decoding
    every frame once at ``match_width`` (streamed: histograms at
    ``analysis_width`` and the frames that end shots are kept). With
    ``match_width`` 0, shots merge by colour alone."""
    width = max(analysis_width, match_width) if match_width else analysis_width
    shots = shots_from_frames(iter_frames(path, width=width), cut_threshold, cut_ratio, duration,
                              hist_width=analysis_width)
    merged = merge_shots(shots, merge_similarity, min_shot_s, geometric=bool(match_width))
    return [{"start": round(s.start, 4), "end": round(s.end, 4), "frames": s.frames} for s in merged]

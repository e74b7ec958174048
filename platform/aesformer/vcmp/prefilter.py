"""Stage 5a, cheap CPU prefilters: only plausible frames reach the VLM.

- :func:`overlay_score` (0..1) finds what tutorials draw over the camera
  view: thin bright grid lines (a column or row that is a bright ridge over
  most of the frame) and subtitle or UI bands (a straight horizontal edge
  across nearly the whole width). Photographs rarely have either.
- :func:`sharpness`: variance of the Laplacian at a fixed width;
  :func:`detail`: coarse tile-wise detail that captions and grid lines cannot fake.
- motion (from :mod:`.sample`): change from the previous decoded frame.
- :func:`trim_letterbox`: the box inside uniform black borders.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

ANALYSIS_WIDTH = 256


def _grey(arr: np.ndarray, width: int = ANALYSIS_WIDTH) -> np.ndarray:
    import cv2

    g = cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY) if arr.ndim == 3 else arr
    if g.shape[1] != width:
        h = max(8, round(g.shape[0] * width / g.shape[1]))
        g = cv2.resize(g, (width, h), interpolation=cv2.INTER_AREA)
    return g.astype(np.float32)


def trim_letterbox(arr: np.ndarray, level: int = 18, min_keep: float = 0.3) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the frame inside black bars (rows/columns whose
    brightest pixel is below ``level``); the full frame when the bars would
    leave less than ``min_keep`` of a side."""
    g = arr.max(axis=2) if arr.ndim == 3 else arr
    rows = np.nonzero(g.max(axis=1) >= level)[0]
    cols = np.nonzero(g.max(axis=0) >= level)[0]
    H, W = g.shape
    if len(rows) == 0 or len(cols) == 0:
        return 0, 0, W, H
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    if (y1 - y0) < min_keep * H or (x1 - x0) < min_keep * W:
        return 0, 0, W, H
    return x0, y0, x1, y1


def grid_score(g: np.ndarray, offset: int = 3, contrast: float = 20.0) -> float:
    """Largest fraction of a column (or row) that is a thin bright ridge:
    brighter by ``contrast`` than the pixels ``offset`` away on both sides."""
    o = offset
    best = 0.0
    if g.shape[1] > 2 * o + 1:
        mid = g[:, o:-o]
        ridge = (mid - np.maximum(g[:, :-2 * o], g[:, 2 * o:])) > contrast
        best = max(best, float(ridge.mean(axis=0).max()))
    if g.shape[0] > 2 * o + 1:
        mid = g[o:-o, :]
        ridge = (mid - np.maximum(g[:-2 * o, :], g[2 * o:, :])) > contrast
        best = max(best, float(ridge.mean(axis=1).max()))
    return best


def band_score(g: np.ndarray, step: int = 2, contrast: float = 25.0, margin: int = 3) -> float:
    """Largest fraction of a row where the brightness steps by ``contrast``
    in the same direction from ``step`` rows above to ``step`` rows below: the
    straight edge of a band laid across the frame."""
    if g.shape[0] <= 2 * (step + margin):
        return 0.0
    e = g[2 * step:, :] - g[:-2 * step, :]
    e = e[margin:-margin] if margin else e
    up = (e > contrast).mean(axis=1)
    down = (e < -contrast).mean(axis=1)
    return float(max(up.max(), down.max()))


def overlay_score(arr: np.ndarray) -> float:
    """0..1: how much a frame looks like it carries overlays (see module doc)."""
    g = _grey(arr)
    return max(grid_score(g), band_score(g))


def sharpness(arr: np.ndarray) -> float:
    """Variance of the Laplacian of the grey frame at 256 px wide."""
    import cv2

    g = _grey(arr)
    return float(cv2.Laplacian(g, cv2.CV_32F).var())


def detail(arr: np.ndarray, width: int = 64, tile: int = 8, quantile: float = 0.75) -> float:
    """Sharpness that overlays cannot fake: the Laplacian energy (mean
    square) of each ``tile``-pixel square of the grey frame at a coarse
    ``width``, and the ``quantile`` of those tiles. At that scale thin grid
    lines and caption text nearly vanish and cover a minority of tiles, so a
    blurred still under a caption reads as blurred, while :func:`sharpness`
    (the whole frame's variance at 256 px) counts the text's edges."""
    import cv2

    lap = cv2.Laplacian(_grey(arr, width), cv2.CV_32F) ** 2
    H, W = lap.shape
    h, w = max(1, H // tile), max(1, W // tile)
    tiles = lap[:h * tile, :w * tile].reshape(h, tile, w, tile).mean(axis=(1, 3))
    return float(np.quantile(tiles, quantile))


def frame_checks(arr: np.ndarray, motion: Optional[float]) -> dict:
    """The cheap scores of one frame: overlay, sharpness, detail, motion."""
    return {"overlay": round(overlay_score(arr), 4), "sharpness": round(sharpness(arr), 2),
            "detail": round(detail(arr), 2), "motion": None if motion is None else round(float(motion), 5)}


def plausible(checks: Sequence[dict], overlay_max: float, min_sharpness: float, rel_sharpness: float,
              max_motion: float, min_detail: float = 0.0, rel_detail: float = 0.0) -> list[tuple[bool, str]]:
    """(plausible, reason) per frame of one segment, given their checks in
    time order; frame 0 is the poor view.

    Sharpness bars: absolute and relative to the sharpest frame that could be
    the result (overlay-free, detailed and still: overlays, captions and
    transitions add or blur edges of their own); *detail* (see :func:`detail`) at least
    ``min_detail`` — below it with edges enough for ``min_sharpness`` the
    frame is a blurred still under a caption (narration B-roll) — and at
    least ``rel_detail`` × the segment's most detailed frame and × the poor
    view's. A frame without a motion reading is not judged stable."""
    def candidate(c):  # could be the shown result: clean, detailed and held still
        return (c["overlay"] <= overlay_max and (c.get("detail") is None or c["detail"] >= min_detail)
                and c["motion"] is not None and c["motion"] <= max_motion)

    top = max((c["sharpness"] for c in checks if candidate(c)), default=0.0)
    details = [c.get("detail") for c in checks]
    top_detail = max((d for d in details[1:] if d is not None), default=0.0)  # the poor view has its own bar
    poor_detail = details[0] if details and details[0] is not None else 0.0
    out = []
    for c in checks:
        d = c.get("detail")
        if c["overlay"] > overlay_max:
            out.append((False, f"overlay {c['overlay']:.2f} > {overlay_max}"))
        elif d is not None and d < min_detail and c["sharpness"] >= min_sharpness:
            out.append((False, f"captioned still: detail {d:.0f} < {min_detail}, edges only from text or overlays"))
        elif c["sharpness"] < min_sharpness or (d is not None and d < min_detail):
            out.append((False, f"blurred: sharpness {c['sharpness']:.0f} < {min_sharpness}" if c["sharpness"] < min_sharpness
                        else f"blurred: detail {d:.0f} < {min_detail}"))
        elif d is not None and d < rel_detail * top_detail:
            out.append((False, f"blurred: detail {d:.0f} < {rel_detail} x segment best {top_detail:.0f}"))
        elif d is not None and d < rel_detail * poor_detail:
            out.append((False, f"blurred: detail {d:.0f} < {rel_detail} x poor view {poor_detail:.0f}"))
        elif c["sharpness"] < rel_sharpness * top:
            out.append((False, f"blurred: sharpness {c['sharpness']:.0f} < {rel_sharpness} x segment best {top:.0f}"))
        elif c["motion"] is None or c["motion"] > max_motion:
            out.append((False, "unstable: no motion reading" if c["motion"] is None
                        else f"unstable: motion {c['motion']:.3f} > {max_motion}"))
        else:
            out.append((True, "plausible"))
    return out

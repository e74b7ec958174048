"""The measured teacher: what changed between the poor and the good photo,
estimated from the pixels, and a seven-dimension plan written from it.

Geometry follows :mod:`aesformer.synth`'s conventions, so a measurement can
be compared with a synthetic pair's ground truth number for number:

- ``aspect_poor``, ``aspect_good``: width / height of each image;
- ``zoom``: sqrt(scene area the poor frame shows / scene area of the good
  frame); > 1 means the good image is the tighter crop;
- ``rotation_deg``: tilt of the poor frame's horizon relative to the good
  one, degrees, positive = counter-clockwise;
- ``shift`` [dx, dy]: where the good frame's centre (the subject the
  photographer framed) sits in the poor frame, relative to its centre, as
  fractions of the poor width / height.

They come from a similarity transform (scale, rotation, translation) fitted
with RANSAC to SIFT feature matches (ORB when SIFT finds too few), mapping
good pixels to poor pixels. Brightness, contrast, saturation, colour
temperature and sharpness are compared on the part of the scene both images
show. The plan says how to turn the poor photo into the good one, in phrases
a program can check ("crop tighter (zoom in 1.30x)", "rotate 4.0° clockwise
to level the horizon", "move the subject left by 12% of the width"), and
says plainly what it cannot measure (pose, viewpoint beyond the tilt).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from aesformer.actions import ActionPlan

# Changes smaller than these are reported as "keep": below them a measurement
# cannot tell a deliberate change from matching noise.
ASPECT_TOL = 0.03  # relative change of w/h
ZOOM_TOL = 0.05  # relative change of the covered scene's linear size
ROTATION_TOL = 1.0  # degrees
SHIFT_TOL = 0.03  # fraction of the frame
BRIGHTNESS_TOL = 0.05  # relative change of mean luminance
CONTRAST_TOL = 0.08  # relative change of the luminance spread
SATURATION_TOL = 0.08  # relative change of mean chroma
TEMPERATURE_TOL = 2.0  # change of mean Lab b* (yellow-blue), CIELAB units
SHARPNESS_TOL = 1.0  # |log2| of the Laplacian-variance ratio (2x)

MIN_INLIERS = 10

# Named aspect ratios (w, h); a measured ratio within 2% takes the name.
_NAMED_RATIOS = ((1, 1), (5, 4), (4, 3), (3, 2), (16, 10), (16, 9), (2, 1), (21, 9),
                 (4, 5), (3, 4), (2, 3), (10, 16), (9, 16), (1, 2))


def ratio_name(aspect: float) -> str:
    """"16:9" for 1.777…, "3:4" for 0.75, else "1.42:1" / "1:1.42"."""
    for w, h in _NAMED_RATIOS:
        if abs(aspect - w / h) / (w / h) < 0.02:
            return f"{w}:{h}"
    return f"{aspect:.2f}:1" if aspect >= 1 else f"1:{1 / aspect:.2f}"


# -- image helpers -----------------------------------------------------------------

def _to_array(image: Any) -> np.ndarray:
    """PIL image or HxWx3 uint8 array → RGB uint8 array."""
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return arr[..., :3].astype(np.uint8)


def _downscale(arr: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """(resized array, factor) with the longer side at most ``max_side``."""
    import cv2

    h, w = arr.shape[:2]
    f = min(1.0, max_side / max(h, w))
    if f >= 1.0:
        return arr, 1.0
    return cv2.resize(arr, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA), f


def _match(gray_good: np.ndarray, gray_poor: np.ndarray, method: str, ratio: float = 0.75):
    """Matched keypoint coordinates (good Nx2, poor Nx2) with Lowe's ratio test."""
    import cv2

    if method == "sift":
        det = cv2.SIFT_create(nfeatures=1500)
        norm = cv2.NORM_L2
    else:
        det = cv2.ORB_create(nfeatures=1500)
        norm = cv2.NORM_HAMMING
    kg, dg = det.detectAndCompute(gray_good, None)
    kp, dp = det.detectAndCompute(gray_poor, None)
    if dg is None or dp is None or len(kg) < 2 or len(kp) < 2:
        return np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
    knn = cv2.BFMatcher(norm).knnMatch(dg, dp, k=2)
    good_pts, poor_pts = [], []
    for pair in knn:
        if len(pair) == 2 and pair[0].distance < ratio * pair[1].distance:
            good_pts.append(kg[pair[0].queryIdx].pt)
            poor_pts.append(kp[pair[0].trainIdx].pt)
    return np.asarray(good_pts, np.float32).reshape(-1, 2), np.asarray(poor_pts, np.float32).reshape(-1, 2)


def _fit_similarity(good_pts: np.ndarray, poor_pts: np.ndarray, thresh: float):
    """2×3 similarity good → poor (RANSAC) and the inlier count, or (None, 0)."""
    import cv2

    if len(good_pts) < MIN_INLIERS:
        return None, 0
    M, inliers = cv2.estimateAffinePartial2D(good_pts, poor_pts, method=cv2.RANSAC, ransacReprojThreshold=thresh,
                                             maxIters=5000, confidence=0.999, refineIters=20)
    if M is None or inliers is None:
        return None, 0
    return M, int(inliers.sum())


def _lab(arr: np.ndarray) -> np.ndarray:
    import cv2

    lab = cv2.cvtColor(arr, cv2.COLOR_RGB2LAB).astype(np.float32)
    # OpenCV's 8-bit Lab: L in 0..255 for 0..100, a/b offset by 128
    lab[..., 0] *= 100.0 / 255.0
    lab[..., 1:] -= 128.0
    return lab


def _tone(arr: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Mean luminance, luminance spread, mean chroma, mean a*, b*, sharpness
    over the pixels where ``mask`` is set."""
    import cv2

    lab = _lab(arr)
    sel = lab[mask]
    L, a, b = sel[:, 0], sel[:, 1], sel[:, 2]
    # sharpness at half scale, where the resampling of a warp (or of a
    # video scaler) no longer reads as lost detail
    gray = cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
    half = (max(1, gray.shape[1] // 2), max(1, gray.shape[0] // 2))
    lap = cv2.Laplacian(cv2.resize(gray, half, interpolation=cv2.INTER_AREA), cv2.CV_32F, ksize=3)
    # erode the mask so the border of the overlap does not count as an edge
    small_mask = cv2.resize(mask.astype(np.uint8), half, interpolation=cv2.INTER_NEAREST)
    inner = cv2.erode(small_mask, np.ones((5, 5), np.uint8)).astype(bool)
    lap_sel = lap[inner] if inner.sum() > 100 else lap[small_mask.astype(bool)]
    return {"luminance": float(L.mean()), "spread": float(L.std()), "chroma": float(np.hypot(a, b).mean()),
            "a": float(a.mean()), "b": float(b.mean()), "sharpness": float(lap_sel.var())}


def _rel(new: float, old: float) -> float:
    return float(new / old - 1.0) if old > 1e-6 else 0.0


# -- measurement -------------------------------------------------------------------

def measure_pair(poor: Any, good: Any, *, max_side: int = 480) -> dict:
    """What changed from ``poor`` to ``good`` (PIL images or RGB arrays).

    Returns a JSON-serialisable dict: ``geometry_ok`` (False with
    ``geometry_reason`` when the two images could not be registered; then
    ``zoom``, ``rotation_deg`` and ``shift`` are None), the fields named in
    the module doc, ``overlap`` (fraction of the good frame the poor frame
    shows), ``matches``/``inliers``/``method``, ``matrix`` (2×3, good →
    poor pixels, like ``synth``'s truth), and the tone changes (good
    relative to poor): ``brightness``, ``contrast``, ``saturation``
    (relative), ``temperature`` and ``tint`` (Δb*, Δa*), ``sharpness``
    (log2 of the Laplacian-variance ratio), measured on the shared part of
    the scene (``tone_region``: "overlap" or "whole" when unregistered).
    """
    import cv2

    p_full, g_full = _to_array(poor), _to_array(good)
    ph, pw = p_full.shape[:2]
    gh, gw = g_full.shape[:2]
    p_small, fp = _downscale(p_full, max_side)
    g_small, fg = _downscale(g_full, max_side)
    gray_p = cv2.cvtColor(p_small, cv2.COLOR_RGB2GRAY)
    gray_g = cv2.cvtColor(g_small, cv2.COLOR_RGB2GRAY)

    out: dict[str, Any] = {
        "aspect_poor": round(pw / ph, 6), "aspect_good": round(gw / gh, 6),
        "poor_size": [pw, ph], "good_size": [gw, gh],
        "geometry_ok": False, "geometry_reason": None, "method": None, "matches": 0, "inliers": 0,
        "zoom": None, "rotation_deg": None, "shift": None, "overlap": None, "matrix": None,
    }
    thresh = max(2.0, 0.006 * max(g_small.shape[:2]))
    best = (None, 0, 0, None)
    for method in ("sift", "orb"):
        gp, pp = _match(gray_g, gray_p, method)
        M, n_in = _fit_similarity(gp, pp, thresh)
        if M is not None and n_in > best[1]:
            best = (M, n_in, len(gp), method)
        if best[1] >= 4 * MIN_INLIERS:
            break  # SIFT registered it well; ORB would not do better
    M_small, n_in, n_match, method = best
    out["matches"], out["inliers"], out["method"] = n_match, n_in, method

    if M_small is None or n_in < MIN_INLIERS:
        out["geometry_reason"] = f"too few matching features to register the two images ({n_in} inliers)"
    else:
        # back to full-resolution pixels: p_full = M_small(g_full * fg) / fp
        M = M_small.astype(np.float64).copy()
        M[:, :2] *= fg / fp
        M[:, 2] /= fp
        s = math.hypot(M[0, 0], M[0, 1])
        # synth's R(θ) = s·[[cos, sin], [-sin, cos]]: a visual counter-clockwise turn with y down
        theta = math.degrees(math.atan2(M[0, 1], M[0, 0]))
        zoom = pw / (s * math.sqrt(gw * gh * (pw / ph)))
        centre = M @ np.array([gw / 2.0, gh / 2.0, 1.0])
        shift = [(centre[0] - pw / 2.0) / pw, (centre[1] - ph / 2.0) / ph]
        if not (0.1 < zoom < 10.0):
            out["geometry_reason"] = f"implausible registration (zoom {zoom:.2f})"
        else:
            out.update(geometry_ok=True, zoom=round(zoom, 4), rotation_deg=round(theta, 3),
                       shift=[round(shift[0], 4), round(shift[1], 4)],
                       matrix=[[round(float(v), 6) for v in row] for row in M])

    # tone: compare on the part of the scene both show (poor warped into the good frame, small scale)
    gs_h, gs_w = g_small.shape[:2]
    if out["geometry_ok"]:
        M_gp = M_small.astype(np.float64)
        warped = cv2.warpAffine(p_small, M_gp, (gs_w, gs_h), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP)
        valid = cv2.warpAffine(np.ones(p_small.shape[:2], np.uint8), M_gp, (gs_w, gs_h),
                               flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP, borderValue=0).astype(bool)
        overlap = float(valid.mean())
        out["overlap"] = round(overlap, 4)
    else:
        overlap = 0.0
    if overlap > 0.1:
        t_good = _tone(g_small, valid)
        t_poor = _tone(warped, valid)
        out["tone_region"] = "overlap"
    else:
        t_good = _tone(g_small, np.ones(g_small.shape[:2], bool))
        t_poor = _tone(p_small, np.ones(p_small.shape[:2], bool))
        out["tone_region"] = "whole"
    out.update(
        brightness=round(_rel(t_good["luminance"], t_poor["luminance"]), 4),
        contrast=round(_rel(t_good["spread"], t_poor["spread"]), 4),
        saturation=round(_rel(t_good["chroma"], t_poor["chroma"]), 4),
        temperature=round(t_good["b"] - t_poor["b"], 3),
        tint=round(t_good["a"] - t_poor["a"], 3),
        sharpness=round(math.log2(max(t_good["sharpness"], 1e-6) / max(t_poor["sharpness"], 1e-6)), 3),
    )
    return out


# -- directions --------------------------------------------------------------------

def directions(m: dict) -> dict[str, Optional[str]]:
    """The direction of each measured change, as the plan states it (poor →
    good), or None where the change was not measured:

    aspect "wider" | "narrower" | "keep"; zoom "in" | "out" | "keep";
    rotation "clockwise" | "counter-clockwise" | "keep"; move_x "left" |
    "right" | "keep"; move_y "up" | "down" | "keep".

    Works on a measurement and on ``synth`` truth alike (same keys).
    """
    out: dict[str, Optional[str]] = {}
    change = m["aspect_good"] / m["aspect_poor"] - 1.0
    out["aspect"] = "keep" if abs(change) < ASPECT_TOL else ("wider" if change > 0 else "narrower")
    zoom, rot, shift = m.get("zoom"), m.get("rotation_deg"), m.get("shift")
    out["zoom"] = None if zoom is None else (
        "keep" if abs(zoom - 1.0) < ZOOM_TOL else ("in" if zoom > 1 else "out"))
    # the poor horizon tilts counter-clockwise by θ: turn it back clockwise
    out["rotation"] = None if rot is None else (
        "keep" if abs(rot) < ROTATION_TOL else ("clockwise" if rot > 0 else "counter-clockwise"))
    if shift is None:
        out["move_x"] = out["move_y"] = None
    else:
        # the subject sits right of centre in the poor frame: move it left
        out["move_x"] = "keep" if abs(shift[0]) < SHIFT_TOL else ("left" if shift[0] > 0 else "right")
        out["move_y"] = "keep" if abs(shift[1]) < SHIFT_TOL else ("up" if shift[1] > 0 else "down")
    return out


# -- the plan --------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{abs(x) * 100:.0f}%"


def plan_from_measurement(m: dict) -> ActionPlan:
    """The seven-dimension plan (poor → good) for a measurement."""
    d = directions(m)
    a_from, a_to = ratio_name(m["aspect_poor"]), ratio_name(m["aspect_good"])
    portrait = m["aspect_good"] < 1.0
    if d["aspect"] == "keep":
        ratio = f"Keep the {a_from} aspect ratio."
    else:
        verb = "widen" if d["aspect"] == "wider" else "narrow"
        shape = "portrait" if portrait else ("square" if a_to == "1:1" else "landscape")
        ratio = f"{verb.capitalize()} the aspect ratio from {a_from} to {a_to} ({shape} frame)."

    geometry_missing = f"Not measured: {m.get('geometry_reason') or 'the two images could not be registered'}."
    if d["zoom"] is None:
        composition = f"Framing change {geometry_missing[0].lower()}{geometry_missing[1:]}"
    elif d["zoom"] == "keep":
        composition = "Keep the framing scale (no zoom change measured)."
    elif d["zoom"] == "in":
        composition = (f"Crop tighter (zoom in {m['zoom']:.2f}x) so the subject fills more of the frame "
                       f"and the distracting edges drop out.")
    else:
        composition = (f"Widen the framing (zoom out {1 / m['zoom']:.2f}x) to show more of the scene "
                       f"around the subject.")
        if m.get("overlap") is not None and m["overlap"] < 0.95:
            composition += f" About {_pct(1 - m['overlap'])} of the good frame lies outside the original view."

    if d["rotation"] is None:
        camera = f"Camera tilt {geometry_missing[0].lower()}{geometry_missing[1:]}"
    elif d["rotation"] == "keep":
        camera = "The horizon is already level; keep the camera angle."
    else:
        camera = f"Rotate {abs(m['rotation_deg']):.1f}° {d['rotation']} to level the horizon."
    camera += " A change of camera height or viewpoint beyond the tilt cannot be measured from the two images."

    if d["move_x"] is None:
        position = f"Subject placement {geometry_missing[0].lower()}{geometry_missing[1:]}"
    else:
        moves = []
        if d["move_x"] != "keep":
            moves.append(f"{d['move_x']} by {_pct(m['shift'][0])} of the width")
        if d["move_y"] != "keep":
            moves.append(f"{d['move_y']} by {_pct(m['shift'][1])} of the height")
        position = ("Move the subject " + " and ".join(moves) + ", to where the good frame places it."
                    if moves else "Keep the subject where it is in the frame.")

    pose = "Not measured: a change of the subject's pose cannot be measured from pixel geometry; keep the pose as it is."

    s = m.get("sharpness", 0.0)
    if abs(s) < SHARPNESS_TOL:
        focus = "Keep the focus as it is (no sharpness change measured); depth of field is not measured."
    elif s > 0:
        focus = f"Sharpen the focus on the subject (detail {2 ** s:.1f}x stronger); depth of field is not measured."
    else:
        focus = f"Soften the image (detail {2 ** -s:.1f}x weaker, e.g. a shallower depth of field)."

    tones = []
    if abs(m["brightness"]) >= BRIGHTNESS_TOL:
        tones.append(f"{'brighten' if m['brightness'] > 0 else 'darken'} the exposure by {_pct(m['brightness'])}")
    if abs(m["contrast"]) >= CONTRAST_TOL:
        tones.append(f"{'increase' if m['contrast'] > 0 else 'reduce'} contrast by {_pct(m['contrast'])}")
    if abs(m["saturation"]) >= SATURATION_TOL:
        tones.append(f"{'raise' if m['saturation'] > 0 else 'lower'} saturation by {_pct(m['saturation'])}")
    if abs(m["temperature"]) >= TEMPERATURE_TOL:
        tones.append(f"{'warm' if m['temperature'] > 0 else 'cool'} the colour temperature "
                     f"(b* {m['temperature']:+.1f})")
    color = (tones[0][0].upper() + "; ".join(tones)[1:] + ".") if tones else \
        "Keep the colour and lighting (no brightness, contrast, saturation or colour temperature change measured)."

    return ActionPlan(ratio=ratio, composition=composition, camera=camera, position=position, pose=pose,
                      focus=focus, color=color)

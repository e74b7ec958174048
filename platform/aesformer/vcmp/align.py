"""Stage 9b, geometric alignment: do the poor and the good frame show
overlapping views of the same scene?

ORB features of both images are matched (Hamming distance, Lowe's ratio
test, both directions) and a similarity transform (rotation, uniform scale,
translation: what re-framing a camera does) is fitted with RANSAC. The
check reports the inliers, their share of the matches and the *overlap*:
the fraction of the good image that lands inside the poor frame under the
fitted transform. Features of the poor frame are taken between its top and
bottom bands (``poor_rows``), where tutorials draw the camera UI and
subtitles, whose strong corners would otherwise crowd out the scene's.
:func:`plausible_transform` then asks for a camera-like transform: a
moderate scale change and tilt.
"""
from __future__ import annotations

import math

import numpy as np


def _grey_at(arr: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    import cv2

    g = cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY) if arr.ndim == 3 else arr
    s = side / max(g.shape[:2])
    if abs(s - 1) > 1e-3:
        g = cv2.resize(g, (max(8, round(g.shape[1] * s)), max(8, round(g.shape[0] * s))),
                       interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
    return g, s


def geometric_check(poor: np.ndarray, good: np.ndarray, n_features: int = 1500, match_side: int = 320,
                    ratio: float = 0.8, ransac_px: float = 3.0,
                    poor_rows: tuple[float, float] = (0.12, 0.78)) -> dict:
    """{matches, inliers, inlier_ratio, overlap, scale, rotation_deg, matrix}
    for a poor and a good RGB frame; zeros when too few features match.
    ``scale``, ``rotation_deg`` and ``matrix`` (2×3) describe the fitted
    good → poor transform."""
    import cv2

    gp, sp = _grey_at(poor, match_side)
    gg, sg = _grey_at(good, match_side)
    orb = cv2.ORB_create(nfeatures=n_features, scaleFactor=1.15, nlevels=8, edgeThreshold=10, patchSize=11,
                         fastThreshold=5)
    mask = np.zeros_like(gp)
    mask[int(gp.shape[0] * poor_rows[0]):int(gp.shape[0] * poor_rows[1])] = 255
    kp_p, des_p = orb.detectAndCompute(gp, mask)
    kp_g, des_g = orb.detectAndCompute(gg, None)
    empty = {"matches": 0, "inliers": 0, "inlier_ratio": 0.0, "overlap": 0.0, "scale": None, "rotation_deg": None,
             "matrix": None}
    if des_p is None or des_g is None or len(kp_p) < 3 or len(kp_g) < 3:
        return empty
    bf = cv2.BFMatcher(cv2.NORM_HAMMING)

    def good_matches(a, b):
        out = {}
        for pair in bf.knnMatch(a, b, k=2):
            if len(pair) == 2 and pair[0].distance < ratio * pair[1].distance:
                out[pair[0].queryIdx] = pair[0].trainIdx
        return out

    fwd = good_matches(des_g, des_p)
    back = good_matches(des_p, des_g)
    pairs = [(q, t) for q, t in fwd.items() if back.get(t) == q]  # mutual best matches
    if len(pairs) < 3:
        return {**empty, "matches": len(pairs)}
    src = np.float32([kp_g[q].pt for q, _ in pairs]) / sg  # good pixels
    dst = np.float32([kp_p[t].pt for _, t in pairs]) / sp  # poor pixels
    M, inl = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=ransac_px / sp,
                                         maxIters=3000, confidence=0.995)
    if M is None or inl is None:
        return {**empty, "matches": len(pairs)}
    n_in = int(inl.sum())
    scale = float(math.hypot(M[0, 0], M[1, 0]))
    rot = float(math.degrees(math.atan2(-M[1, 0], M[0, 0])))  # counter-clockwise positive (y down)
    H, W = good.shape[:2]
    corners = np.float32([[0, 0], [W, 0], [W, H], [0, H]])
    mapped = corners @ M[:, :2].T + M[:, 2]
    ph, pw = poor.shape[:2]
    frame = np.float32([[0, 0], [pw, 0], [pw, ph], [0, ph]])
    area, _ = cv2.intersectConvexConvex(mapped.astype(np.float32), frame)
    mapped_area = abs(cv2.contourArea(mapped.astype(np.float32)))
    overlap = float(area / mapped_area) if mapped_area > 0 else 0.0
    return {"matches": len(pairs), "inliers": n_in, "inlier_ratio": round(n_in / len(pairs), 4),
            "overlap": round(min(1.0, overlap), 4), "scale": round(scale, 4), "rotation_deg": round(rot, 3),
            "matrix": [[round(float(v), 5) for v in r] for r in M]}


def is_identity(check: dict, shape: tuple[int, int], max_scale_change: float, max_rotation_deg: float,
                max_shift: float) -> bool:
    """Whether a :func:`geometric_check` transform (``matrix`` good → poor
    pixels) leaves the view where it was: scale, tilt and the move of the
    frame's centre (as a fraction of the poor frame's diagonal) all small."""
    M = check.get("matrix")
    if M is None or check["scale"] is None:
        return False
    M = np.asarray(M, dtype=float)
    h, w = shape[:2]
    c = np.array([w / 2, h / 2])
    moved = float(np.hypot(*(M[:, :2] @ c + M[:, 2] - c))) / math.hypot(w, h)
    return (abs(check["scale"] - 1) <= max_scale_change and abs(check["rotation_deg"]) <= max_rotation_deg
            and moved <= max_shift)


def low_pass_change(poor: np.ndarray, frame: np.ndarray, width: int = 64) -> float:
    """Median absolute difference (0..1) of two frames as blurred grey
    thumbnails: noise and compression are blurred away and a caption or
    overlay covers less than half the frame, so only a change of the view
    itself moves the median."""
    import cv2

    a, _ = _grey_at(poor, width)
    b = cv2.resize(_grey_at(frame, width)[0], (a.shape[1], a.shape[0]), interpolation=cv2.INTER_AREA)
    a = cv2.GaussianBlur(a.astype(np.float32), (0, 0), 1.0)
    b = cv2.GaussianBlur(b.astype(np.float32), (0, 0), 1.0)
    return float(np.median(np.abs(a - b))) / 255.0


def view_change(poor: np.ndarray, frame: np.ndarray, *, min_inliers: int = 8, max_scale_change: float = 0.05,
                max_rotation_deg: float = 2.0, max_shift: float = 0.04, min_change: float = 0.03,
                min_detail: float = 60.0, match_side: int = 320) -> dict:
    """Does ``frame`` show an improvement over the ``poor`` frame, or the
    same picture? {same, reason, scale, rotation_deg, inliers, change}.

    The same picture: features of the whole frames (overlays included)
    match under a near-identity transform — the same shot held, a hand's
    jitter, noise, compression or a new caption — or, when too few features
    match or one frame is a blurred still (its only features are a caption's
    letters; :func:`aesformer.vcmp.prefilter.detail` below ``min_detail``),
    the blurred thumbnails hardly differ."""
    from aesformer.vcmp.prefilter import detail

    g = geometric_check(poor, frame, match_side=match_side, poor_rows=(0.0, 1.0))
    change = round(low_pass_change(poor, frame), 4)
    out = {"scale": g["scale"], "rotation_deg": g["rotation_deg"], "inliers": g["inliers"], "change": change}
    if g["inliers"] >= min_inliers and is_identity(g, poor.shape, max_scale_change, max_rotation_deg, max_shift):
        return {**out, "same": True, "reason": f"no improvement: the poor frame's view ({g['inliers']} features "
                                               f"match, scale {g['scale']:.2f}, tilt {g['rotation_deg']:.1f} deg)"}
    featureless = g["inliers"] < min_inliers or min(detail(poor), detail(frame)) < min_detail
    if featureless and change < min_change:
        return {**out, "same": True, "reason": f"no improvement: hardly differs from the poor frame "
                                               f"(change {change:.3f} < {min_change})"}
    return {**out, "same": False, "reason": "view changed"}


def plausible_transform(check: dict, min_inliers: int, min_inlier_ratio: float, min_overlap: float,
                        scale_range: tuple[float, float] = (0.3, 3.0), max_rotation_deg: float = 30.0
                        ) -> tuple[bool, str]:
    """(ok, reason) for a :func:`geometric_check` result."""
    if check["inliers"] < min_inliers:
        return False, f"geometry: {check['inliers']} inliers < {min_inliers}"
    if check["inlier_ratio"] < min_inlier_ratio:
        return False, f"geometry: inlier ratio {check['inlier_ratio']:.2f} < {min_inlier_ratio}"
    s = check["scale"]
    if s is None or not scale_range[0] <= s <= scale_range[1]:
        return False, f"geometry: scale {s} outside {list(scale_range)}"
    if abs(check["rotation_deg"]) > max_rotation_deg:
        return False, f"geometry: rotation {check['rotation_deg']:.1f} beyond {max_rotation_deg} degrees"
    if check["overlap"] < min_overlap:
        return False, f"geometry: overlap {check['overlap']:.2f} < {min_overlap}"
    return True, "views overlap"

"""Synthetic capture flaws with their ground truth.

``poor_framing`` turns a well-framed photo (the *good* image) into the view a
careless photographer would have taken of the same scene: a tilted horizon,
an off-centre or cut-off subject, a tighter or looser crop, a different
aspect ratio. It returns the poor image together with the exact transform,
so tests of the thinker, the distillation validator and the editor can check
a plan or an edit against known numbers. ``draw_overlays`` adds what a photo
tutorial video lays over the camera view: subtitles, the camera UI and
rule-of-thirds grid lines.

Geometry (image coordinates, y down, pixels). The good image is W×H with
centre c_g; the poor image is pw×ph with centre c_p. A good pixel g lands at

    p = c_p + s · R(θ) · (g − c_g) + (shift_x · pw, shift_y · ph)

with R(θ) a *visual* counter-clockwise rotation by ``rotation_deg`` and
s = pw / (zoom · sqrt(W·H·aspect_poor)) the scale. ``zoom`` > 1 means the
poor frame covers more of the scene (the good image is the tighter crop);
``shift`` is where the good image's centre (the subject) sits in the poor
frame, relative to the centre, as fractions of the poor width/height. Parts of
the poor view outside the photo are filled by mirroring its border, which
reads as more of the same scene. ``truth["matrix"]`` holds the 2×3 affine
matrix good → poor pixels.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Aspect ratios (w/h) a phone camera offers; the poor frame may use another
# than the good one.
ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 3 / 2)

SUBTITLES = (
    "Step back a little before you shoot",
    "Keep the horizon level",
    "Move the subject off the centre",
    "Now turn the phone sideways",
    "Get lower and shoot from below",
    "Give the subject some room to look into",
    "Tap to focus on the eyes",
    "Wait for the light to soften",
    "Try a square crop here",
    "Let the background blur out",
)


def affine_matrix(good_size: tuple[int, int], poor_size: tuple[int, int], zoom: float,
                  rotation_deg: float, shift: tuple[float, float], aspect_poor: float) -> np.ndarray:
    """The 2×3 matrix mapping good-image pixels to poor-image pixels (see module doc)."""
    W, H = good_size
    pw, ph = poor_size
    s = pw / (zoom * math.sqrt(W * H * aspect_poor))
    t = math.radians(rotation_deg)
    # visual counter-clockwise rotation with y pointing down
    R = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]]) * s
    c_g = np.array([W / 2.0, H / 2.0])
    c_p = np.array([pw / 2.0 + shift[0] * pw, ph / 2.0 + shift[1] * ph])
    return np.hstack([R, (c_p - R @ c_g)[:, None]])


def _visible_fraction(M: np.ndarray, good_size: tuple[int, int], poor_size: tuple[int, int],
                      box: float = 0.5, n: int = 15) -> float:
    """Fraction of the subject box (the central ``box`` of the good image, per
    side) that lands inside the poor frame."""
    W, H = good_size
    xs = np.linspace(W * (1 - box) / 2, W * (1 + box) / 2, n)
    ys = np.linspace(H * (1 - box) / 2, H * (1 + box) / 2, n)
    gx, gy = np.meshgrid(xs, ys)
    pts = np.stack([gx.ravel(), gy.ravel(), np.ones(gx.size)])
    p = M @ pts
    inside = (p[0] >= 0) & (p[0] < poor_size[0]) & (p[1] >= 0) & (p[1] < poor_size[1])
    return float(inside.mean())


def poor_framing(photo: Image.Image, rng: np.random.Generator, *,
                 max_rotation: float = 12.0, min_rotation: float = 2.0,
                 zoom_range: tuple[float, float] = (0.8, 1.5),
                 max_shift: float = 0.22,
                 p_aspect_change: float = 0.5, aspects: Sequence[float] = ASPECTS,
                 p_cut_off: float = 0.3,
                 size: Optional[tuple[int, int]] = None,
                 _box: Optional[tuple[float, float, float, float]] = None) -> tuple[Image.Image, dict]:
    """A badly framed view of the scene in ``photo``, and the transform applied.

    Deterministic for a given ``rng`` state. Every poor frame is tilted by at
    least ``min_rotation`` degrees and off-centre; with probability
    ``p_aspect_change`` it uses another aspect ratio from ``aspects``; with
    probability ``p_cut_off`` it is a tight crop that cuts the subject off.
    ``size`` (w, h) fixes the poor image's size (its aspect then wins over
    the sampled one); by default it keeps the good image's pixel count.
    Where the poor view reaches past the photo, the photo's mirrored border,
    blurred, fills in (use :func:`framing_pair` to show real surroundings).

    ``truth`` keys: ``aspect_good``, ``aspect_poor`` (w/h), ``zoom``,
    ``rotation_deg`` (positive = counter-clockwise), ``shift`` [dx, dy],
    ``subject_cut_off`` (bool), ``subject_visible`` (fraction of the central
    subject box inside the poor frame), ``flaws`` (names of what was done),
    ``good_size``, ``poor_size``, ``matrix`` (2×3, good → poor pixels) and
    ``outside`` (fraction of the poor frame not covered by the source photo).
    """
    src = photo.convert("RGB")
    # the good image is ``_box`` (x0, y0, w, h) of the source photo; all of it by default
    x0, y0, Wf, Hf = _box if _box is not None else (0.0, 0.0, float(src.width), float(src.height))
    W, H = int(round(Wf)), int(round(Hf))
    aspect_good = W / H

    if size is not None:
        pw, ph = int(size[0]), int(size[1])
        aspect_poor = pw / ph
    else:
        aspect_poor = aspect_good
        if rng.random() < p_aspect_change:
            others = [a for a in aspects if abs(a - aspect_good) / aspect_good > 0.05]
            if others:
                aspect_poor = float(others[int(rng.integers(len(others)))])
        pw = max(8, int(round(math.sqrt(W * H * aspect_poor))))
        ph = max(8, int(round(math.sqrt(W * H / aspect_poor))))
        aspect_poor = pw / ph

    rotation = float(rng.uniform(min_rotation, max_rotation)) * (1 if rng.random() < 0.5 else -1)
    cut = rng.random() < p_cut_off
    if cut:
        # a tight view pushed to one side: part of the subject leaves the frame
        zoom = float(rng.uniform(zoom_range[0], min(1.0, zoom_range[1])))
        side = int(rng.integers(4))
        mag = float(rng.uniform(0.3, 0.42))
        jitter = float(rng.uniform(-0.08, 0.08))
        shift = [mag if side == 0 else -mag if side == 1 else jitter,
                 mag if side == 2 else -mag if side == 3 else jitter]
    else:
        lo = math.log(max(1.0, zoom_range[0]))
        zoom = float(math.exp(rng.uniform(lo, math.log(max(zoom_range[1], 1.0)))))
        shift = [float(rng.uniform(-max_shift, max_shift)), float(rng.uniform(-max_shift, max_shift))]
        # off-centre by at least a tenth of the frame along one axis
        k = int(np.argmax(np.abs(shift)))
        if abs(shift[k]) < 0.1:
            shift[k] = 0.1 if shift[k] >= 0 else -0.1

    import cv2

    M = affine_matrix((W, H), (pw, ph), zoom, rotation, (shift[0], shift[1]), aspect_poor)
    # source photo pixels → poor pixels: first into good coordinates
    M_src = M.copy()
    M_src[:, 2] = M[:, 2] - M[:, :2] @ np.array([x0, y0])
    arr = cv2.warpAffine(np.asarray(src), M_src, (pw, ph), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REFLECT_101)
    covered = cv2.warpAffine(np.ones(src.size[::-1], np.float32), M_src, (pw, ph), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    outside = float((covered < 0.5).mean())
    if outside > 0:
        # mirrored border reads as a ghost copy; blurred it reads as out-of-focus surroundings
        k = max(3, (min(pw, ph) // 8) | 1)
        soft = cv2.GaussianBlur(arr, (k, k), 0)
        a = covered[..., None]
        arr = (arr * a + soft * (1 - a)).astype(np.uint8)
    visible = _visible_fraction(M, (W, H), (pw, ph))
    flaws = ["tilt", "off_centre"]
    if abs(aspect_poor - aspect_good) / aspect_good > 0.05:
        flaws.append("aspect")
    if visible < 0.9:
        flaws.append("cut_off")
    flaws.append("loose" if zoom > 1.0 else "tight")
    truth = {
        "aspect_good": round(aspect_good, 6),
        "aspect_poor": round(aspect_poor, 6),
        "zoom": round(zoom, 6),
        "rotation_deg": round(rotation, 4),
        "shift": [round(shift[0], 6), round(shift[1], 6)],
        "subject_cut_off": visible < 0.9,
        "subject_visible": round(visible, 4),
        "flaws": flaws,
        "good_size": [W, H],
        "poor_size": [pw, ph],
        "matrix": [[round(float(v), 8) for v in row] for row in M],
        "outside": round(outside, 4),
    }
    return Image.fromarray(arr, "RGB"), truth


def framing_pair(photo: Image.Image, rng: np.random.Generator, good_fraction: float = 0.7,
                 good_aspect: Optional[float] = None, **limits) -> tuple[Image.Image, Image.Image, dict]:
    """(good, poor, truth) from one photograph seen as the whole scene.

    The good image is a crop covering ``good_fraction`` of the photo's width
    or height (with aspect ``good_aspect``, default the photo's), placed at a
    random spot; the poor view (:func:`poor_framing`, same ``limits``) is
    rendered from the full photo, so a looser poor frame (zoom > 1) shows
    the real surroundings. ``truth`` is relative to the returned good image
    and also records ``good_box`` [x0, y0, w, h] in the photo.
    """
    src = photo.convert("RGB")
    Wp, Hp = src.size
    a = good_aspect or Wp / Hp
    w = good_fraction * min(Wp, Hp * a)
    h = w / a
    x0 = float(rng.uniform(0, Wp - w))
    y0 = float(rng.uniform(0, Hp - h))
    box = (round(x0), round(y0), round(x0 + w), round(y0 + h))
    good = src.crop(box)
    poor, truth = poor_framing(src, rng, _box=(box[0], box[1], box[2] - box[0], box[3] - box[1]), **limits)
    truth["good_box"] = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
    return good, poor, truth


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def draw_overlays(image: Image.Image, rng: np.random.Generator, subtitles: bool = True,
                  ui: bool = True, grid: bool = True, text: Optional[str] = None) -> Image.Image:
    """``image`` with a tutorial's overlays drawn on a copy.

    subtitles: a dark band across the lower part with a line of white text
    (``text``, else one drawn from ``rng``); ui: the camera app's top bar
    (mode, ISO, shutter, battery), a recording dot and a shutter button;
    grid: rule-of-thirds lines. Sizes scale with the image; deterministic for
    the ``rng`` state.
    """
    img = image.convert("RGB").copy()
    W, H = img.size
    layer = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    line = max(1, round(min(W, H) / 160))
    if grid:
        for k in (1, 2):
            x, y = round(W * k / 3), round(H * k / 3)
            d.line([(x, 0), (x, H)], fill=(255, 255, 255, 190), width=line)
            d.line([(0, y), (W, y)], fill=(255, 255, 255, 190), width=line)
    if ui:
        bar = max(8, round(H * 0.09))
        d.rectangle([0, 0, W, bar], fill=(0, 0, 0, 170))
        f = _font(max(6, round(bar * 0.6)))
        iso = int(rng.choice([100, 200, 400, 800]))
        shutter = int(rng.choice([60, 125, 250, 500]))
        d.text((round(W * 0.03), bar * 0.2), f"PHOTO  ISO {iso}  1/{shutter}", fill=(255, 255, 255, 255), font=f)
        # battery
        bw, bh = round(bar * 1.2), round(bar * 0.5)
        bx, by = W - bw - round(W * 0.03), (bar - bh) // 2
        d.rectangle([bx, by, bx + bw, by + bh], outline=(255, 255, 255, 255), width=line)
        d.rectangle([bx + 2 * line, by + 2 * line, bx + round(bw * float(rng.uniform(0.3, 0.9))), by + bh - 2 * line],
                    fill=(120, 230, 120, 255))
        # recording dot and shutter button
        r = max(2, round(bar * 0.2))
        cx = round(W * 0.9) - bw
        d.ellipse([cx - r, bar // 2 - r, cx + r, bar // 2 + r], fill=(230, 40, 40, 255))
        R = max(4, round(min(W, H) * 0.06))
        sx, sy = W - R - round(W * 0.04), H // 2
        d.ellipse([sx - R, sy - R, sx + R, sy + R], outline=(255, 255, 255, 255), width=max(1, line * 2))
        d.ellipse([sx - R + 3 * line, sy - R + 3 * line, sx + R - 3 * line, sy + R - 3 * line],
                  fill=(255, 255, 255, 200))
    if subtitles:
        if text is None:
            text = SUBTITLES[int(rng.integers(len(SUBTITLES)))]
        size = max(6, round(H * 0.07))
        f = _font(size)
        tw = d.textlength(text, font=f)
        while tw > W * 0.92 and size > 6:
            size -= 1
            f = _font(size)
            tw = d.textlength(text, font=f)
        band_top = round(H * 0.80)
        band_h = round(size * 1.6)
        d.rectangle([0, band_top, W, band_top + band_h], fill=(0, 0, 0, 175))
        d.text(((W - tw) / 2, band_top + (band_h - size) / 2 - 1), text, fill=(255, 255, 255, 255), font=f)
    img.paste(layer, (0, 0), layer)
    return img


def fit(image: Image.Image, size: tuple[int, int], mode: str = "cover") -> Image.Image:
    """Resize ``image`` onto a ``size`` canvas: ``cover`` crops the centre to
    the canvas aspect; ``contain`` letterboxes with black bars."""
    W, H = size
    w, h = image.size
    if mode == "cover":
        s = max(W / w, H / h)
    else:
        s = min(W / w, H / h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    resized = image.convert("RGB").resize((nw, nh), Image.BICUBIC)
    if mode == "cover":
        left, top = (nw - W) // 2, (nh - H) // 2
        return resized.crop((left, top, left + W, top + H))
    canvas = Image.new("RGB", (W, H), (0, 0, 0))
    canvas.paste(resized, ((W - nw) // 2, (H - nh) // 2))
    return canvas


def sample_aesrecon(folder: str | os.PathLike, n: int, seed: int, *, side: int = 128, test_fraction: float = 0.0,
                    job: str = "sample") -> Any:
    """A small AesRecon of ``n`` synthetic pairs for jobs run without data:
    the sample photographs in turn, each shrunk to ``side`` pixels on its
    longest edge, a good crop and a poor framing of it (:func:`framing_pair`),
    and the plan the measured teacher writes for that exact transform.
    ``test_fraction`` of the pairs go to the test split. Rerunning keeps the
    pairs already written and adds the missing ones."""
    from aesformer.data import ShardWriter, assign_split, make_pair, make_provenance
    from aesformer.distill.measured import plan_from_measurement
    from aesformer.samples import sample_photos

    photos = sample_photos()
    ids = [f"sample-{i:04d}-{photos[i % len(photos)][0]}" for i in range(n)]
    split = (assign_split(ids, test_size=test_fraction) if test_fraction > 0 else dict.fromkeys(ids, "train"))
    from aesformer import storage

    folder = storage.resolve(folder) if storage.is_uri(folder) else Path(folder)  # a URI stays a string
    with ShardWriter(folder, shard_rows=64) as writer:
        for i, pid in enumerate(ids):
            if pid in writer:
                continue
            name, photo = photos[i % len(photos)]
            photo = photo.copy()
            photo.thumbnail((side, side))
            good, poor, truth = framing_pair(photo, np.random.default_rng(seed + i))
            # geometry is known exactly; the synthetic flaw leaves tone and sharpness alone
            measured = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "temperature": 0.0,
                        "sharpness": 0.0, **truth}
            writer.write(make_pair(pid, poor, good, plan=plan_from_measurement(measured).render(),
                                   video_id=f"sample-{name}", split=split[pid], provenance=make_provenance(job)))
    return folder

"""A second, independent maker of photography-tutorial test videos.

VCMP's rules were tuned on the sample generator the jobs ship
(``aesformer.videos`` / ``aesformer.synth``). This module makes tutorials
another way, sharing no code with it, so the tests can hold VCMP to its
numbers on videos it was not built with:

- other photographs: scikit-learn's ``china`` and ``flower``, matplotlib's
  ``grace_hopper`` (a portrait) and scikit-image's ``camera`` (a grey
  portrait); narration stills use scikit-image's ``brick``,
  ``hubble_deep_field``, ``gravel`` and ``coins`` (none of them is used by
  the sample generator);
- other overlays: outlined captions with focus brackets and a level line,
  a boxed caption with a side control column and a focus square, a ticker
  bar with a dashed grid and a zoom badge;
- narration over a heavily blurred still of the photo just shot and over a
  static captioned still, captions changing mid-still (two frames that differ
  only by their caption);
- a 16:9 frame: portraits pillarboxed, some results letterboxed (2.35:1);
- handheld jitter (a random walk of shift and tilt) on the poor view;
- transitions: a fade through black, a dissolve, or a straight cut from the
  poor view to the result.

The truth labels every written frame: ``labels[i] = [kind, event]`` with
kind one of ``poor``, ``transition``, ``good``, ``still`` (narration; event
-1). :func:`score` matches each mined pair to those frames.
Deterministic for a seed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FPS = 12
SIZES = ((320, 180), (384, 216))
EVENT_PHOTOS = ("china", "flower", "grace_hopper", "camera")
STILL_PHOTOS = ("brick", "hubble_deep_field", "gravel", "coins")
STYLES = ("outline", "boxed", "ticker")
TRANSITIONS = ("fade", "dissolve", "cut")
LINES = ("Here is the trick I use", "Watch the edges of the frame", "Now look at the result",
         "Small moves make a big difference", "Let us try another scene", "See you in the next lesson")
TIPS = ("Level it", "Recompose", "Closer", "Mind the edges", "Turn sideways", "Centre the eyes")


# -- photographs --------------------------------------------------------------------------------

def photo(name: str) -> np.ndarray:
    """An RGB uint8 photograph shipped inside an installed package."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        arr = load_sample_image(f"{name}.jpg")
    elif name == "grace_hopper":
        from matplotlib import cbook

        arr = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
    else:
        from skimage import data

        arr = getattr(data, name)()
        if name == "camera":  # a portrait crop of the cameraman
            arr = arr[:, 60:444]
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3]).astype(np.uint8)


def _resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    return cv2.resize(arr, size, interpolation=cv2.INTER_AREA if size[0] < arr.shape[1] else cv2.INTER_CUBIC)


def fill(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Scale and centre-crop to exactly ``size`` (w, h)."""
    W, H = size
    s = max(W / arr.shape[1], H / arr.shape[0])
    r = _resize(arr, (max(W, round(arr.shape[1] * s)), max(H, round(arr.shape[0] * s))))
    y, x = (r.shape[0] - H) // 2, (r.shape[1] - W) // 2
    return np.ascontiguousarray(r[y:y + H, x:x + W])


def boxed(arr: np.ndarray, size: tuple[int, int], aspect: float | None = None) -> np.ndarray:
    """``arr`` inside black bars on a ``size`` canvas: pillarboxed when it is
    narrower than the canvas, letterboxed to ``aspect`` (w/h) when given."""
    W, H = size
    if aspect is not None:  # crop to the wide aspect first
        h = round(arr.shape[1] / aspect)
        y = max(0, (arr.shape[0] - h) // 2)
        arr = arr[y:y + h]
    s = min(W / arr.shape[1], H / arr.shape[0])
    w, h = max(2, round(arr.shape[1] * s)), max(2, round(arr.shape[0] * s))
    out = np.zeros((H, W, 3), np.uint8)
    x0, y0 = (W - w) // 2, (H - h) // 2
    out[y0:y0 + h, x0:x0 + w] = _resize(arr, (w, h))
    return out


def views(src: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """(good, poor, how): the good view is a centred crop of 75 % of the photo;
    the poor view the same scene off-centre, tilted and zoomed (edges
    mirrored), at the same size."""
    import cv2

    Hs, Ws = src.shape[:2]
    cw, ch = round(Ws * 0.75), round(Hs * 0.75)
    gx, gy = (Ws - cw) // 2, (Hs - ch) // 2
    good = np.ascontiguousarray(src[gy:gy + ch, gx:gx + cw])
    tilt = float(rng.choice([-1, 1]) * rng.uniform(4, 9))
    zoom = float(rng.choice([rng.uniform(0.8, 0.9), rng.uniform(1.12, 1.25)]))
    shift = (float(rng.choice([-1, 1]) * rng.uniform(0.14, 0.22)), float(rng.uniform(-0.1, 0.1)))
    centre = (gx + cw / 2 + shift[0] * cw, gy + ch / 2 + shift[1] * ch)
    M = cv2.getRotationMatrix2D(centre, tilt, zoom)
    M[0, 2] += cw / 2 - centre[0]
    M[1, 2] += ch / 2 - centre[1]
    poor = cv2.warpAffine(src, M, (cw, ch), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return good, poor, {"tilt_deg": round(tilt, 2), "zoom": round(zoom, 3), "shift": [round(v, 3) for v in shift]}


def jitter(arr: np.ndarray, dx: float, dy: float, deg: float) -> np.ndarray:
    import cv2

    H, W = arr.shape[:2]
    M = cv2.getRotationMatrix2D((W / 2, H / 2), deg, 1.0)
    M[:, 2] += (dx, dy)
    return cv2.warpAffine(arr, M, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


# -- overlays -----------------------------------------------------------------------------------

def _font(size: int):
    return ImageFont.load_default(size=max(6, size))


def _caption_outline(d: ImageDraw.ImageDraw, W: int, H: int, text: str, y: float) -> None:
    f = _font(round(H * 0.085))
    tw = d.textlength(text, font=f)
    d.text(((W - tw) / 2, H * y), text, font=f, fill=(255, 255, 255, 255), stroke_width=2,
           stroke_fill=(0, 0, 0, 255))


def _caption_box(d: ImageDraw.ImageDraw, W: int, H: int, text: str) -> None:
    f = _font(round(H * 0.075))
    tw = d.textlength(text, font=f)
    x0, y0 = round(W * 0.05), round(H * 0.74)
    d.rounded_rectangle([x0, y0, x0 + tw + 14, y0 + round(H * 0.13)], radius=6, fill=(250, 250, 240, 215))
    d.text((x0 + 7, y0 + round(H * 0.025)), text, font=f, fill=(20, 20, 30, 255))


def overlay(arr: np.ndarray, style: str, text: str) -> np.ndarray:
    """The camera screen of one style over a view (see module doc)."""
    img = Image.fromarray(arr).convert("RGBA")
    W, H = img.size
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    lw = max(1, round(H / 110))
    if style == "outline":
        L, m = round(H * 0.12), round(H * 0.1)
        for cx, cy, sx, sy in ((m, m, 1, 1), (W - m, m, -1, 1), (m, H - m, 1, -1), (W - m, H - m, -1, -1)):
            d.line([(cx, cy), (cx + sx * L, cy)], fill=(255, 220, 0, 255), width=lw)
            d.line([(cx, cy), (cx, cy + sy * L)], fill=(255, 220, 0, 255), width=lw)
        d.line([(W * 0.2, H / 2), (W * 0.45, H / 2)], fill=(255, 220, 0, 230), width=lw)
        d.line([(W * 0.55, H / 2), (W * 0.8, H / 2)], fill=(255, 220, 0, 230), width=lw)
        d.ellipse([W / 2 - 4, H / 2 - 4, W / 2 + 4, H / 2 + 4], outline=(255, 220, 0, 255), width=lw)
        _caption_outline(d, W, H, text, 0.16)
    elif style == "boxed":
        d.rectangle([round(W * 0.86), 0, W, H], fill=(15, 15, 15, 160))
        for k in range(3):
            cy = H * (0.25 + 0.25 * k)
            r = H * (0.08 if k == 1 else 0.05)
            d.ellipse([W * 0.93 - r, cy - r, W * 0.93 + r, cy + r], outline=(255, 255, 255, 255), width=lw)
        fx, fy, s = W * 0.42, H * 0.38, H * 0.16
        d.rectangle([fx - s, fy - s, fx + s, fy + s], outline=(255, 200, 40, 255), width=lw)
        _caption_box(d, W, H, text)
    elif style == "ticker":
        bar = round(H * 0.12)
        d.rectangle([0, 0, W, bar], fill=(20, 60, 170, 220))
        f = _font(round(bar * 0.6))
        d.text((round(W * 0.03), round(bar * 0.18)), text.upper(), font=f, fill=(255, 255, 255, 255))
        for k in (1, 2):
            x, y = W * k / 3, H * k / 3
            for a in range(0, H, 8):
                d.line([(x, a), (x, a + 4)], fill=(255, 255, 255, 200), width=lw)
            for a in range(0, W, 8):
                d.line([(a, y), (a + 4, y)], fill=(255, 255, 255, 200), width=lw)
        r = round(H * 0.07)
        d.ellipse([W / 2 - r, H * 0.88 - r, W / 2 + r, H * 0.88 + r], fill=(0, 0, 0, 150), outline=(255, 255, 255, 255))
        d.text((W / 2 - r * 0.5, H * 0.88 - r * 0.55), "1x", font=_font(r), fill=(255, 230, 0, 255))
    else:
        raise KeyError(style)
    return np.asarray(Image.alpha_composite(img, layer).convert("RGB"))


def still(arr: np.ndarray, size: tuple[int, int], text: str, blur: bool, caption: str) -> np.ndarray:
    """A narration still: ``arr`` filling the frame, heavily blurred or dimmed, under a caption."""
    W, H = size
    base = Image.fromarray(fill(arr, size))
    if blur:
        base = base.filter(ImageFilter.GaussianBlur(min(W, H) / 14))
    else:
        base = Image.blend(base, Image.new("RGB", size, (0, 0, 0)), 0.25)
    img = base.convert("RGBA")
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    if caption == "outline":
        _caption_outline(d, W, H, text, 0.45)
    else:
        _caption_box(d, W, H, text)
    return np.asarray(Image.alpha_composite(img, layer).convert("RGB"))


# -- writing ------------------------------------------------------------------------------------

class Writer:
    def __init__(self, path: Path, size: tuple[int, int], codec: str):
        import av

        self.c = av.open(str(path), "w")
        self.s = self.c.add_stream(codec, rate=FPS)
        self.s.width, self.s.height = size
        self.s.pix_fmt = "yuv420p"
        if codec == "h264":
            self.s.options = {"crf": "20", "preset": "ultrafast"}
        else:
            self.s.bit_rate = 1_500_000
        self.labels: list[list] = []

    def put(self, arr: np.ndarray, kind: str, event: int = -1) -> None:
        import av

        for p in self.s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
            self.c.mux(p)
        self.labels.append([kind, event])

    @property
    def t(self) -> float:
        return len(self.labels) / FPS

    def close(self) -> None:
        for p in self.s.encode():
            self.c.mux(p)
        self.c.close()


def tutorial(path: Path, events: Sequence[str], rng: np.random.Generator, index: int) -> dict:
    """Write one tutorial and return its truth."""
    size = SIZES[index % len(SIZES)]
    ext_codec = ("h264", "mpeg4")[index % 2]
    W, H = size
    w = Writer(path, size, ext_codec)
    truth_events, stills = [], []

    def narration(src: np.ndarray, blur: bool, seconds: float) -> None:
        start, caption = w.t, ("outline", "box")[int(rng.integers(2))]
        a, b = rng.choice(len(LINES), 2, replace=False)
        n = round(seconds * FPS)
        for i in range(n):  # the caption changes halfway: frames that differ only by it
            w.put(still(src, size, LINES[a] if i < n // 2 else LINES[b], blur, caption), "still")
        stills.append({"start": round(start, 4), "end": round(w.t, 4), "blurred": blur})

    try:
        narration(photo(STILL_PHOTOS[index % len(STILL_PHOTOS)]), False, float(rng.uniform(1.5, 2.0)))
        for k, name in enumerate(events):
            src = photo(name)
            good, poor, how = views(src, rng)
            style = STYLES[(index + k) % len(STYLES)]
            portrait = good.shape[0] > good.shape[1]
            wide = not portrait and (index + k) % 3 == 0
            good_frame = boxed(good, size, 2.35 if wide else None) if portrait or wide else fill(good, size)
            poor_base = fill(poor, size)
            tip = TIPS[int(rng.integers(len(TIPS)))]
            start = w.t
            x = y = deg = 0.0
            amp = min(W, H) / 90
            last = None
            for i in range(round(float(rng.uniform(2.0, 2.5)) * FPS)):  # handheld
                x = 0.7 * x + float(rng.normal(0, amp))
                y = 0.7 * y + float(rng.normal(0, amp))
                deg = 0.7 * deg + float(rng.normal(0, 0.4))
                last = overlay(jitter(poor_base, x, y, deg), style, tip)
                w.put(last, "poor", k)
            t_trans = w.t
            kind = TRANSITIONS[(index + 2 * k) % len(TRANSITIONS)]
            if kind == "fade":  # through black
                for a in (0.75, 0.45, 0.15):
                    w.put((last * a).astype(np.uint8), "transition", k)
                for a in (0.3, 0.65, 0.9):
                    w.put((good_frame * a).astype(np.uint8), "transition", k)
            elif kind == "dissolve":
                for a in (0.2, 0.4, 0.6, 0.8):
                    w.put((last * (1 - a) + good_frame * a).astype(np.uint8), "transition", k)
            t_good = w.t
            for i in range(round(float(rng.uniform(1.6, 2.0)) * FPS)):
                w.put(good_frame, "good", k)
            truth_events.append({
                "index": k, "photo": name, "style": style, "transition_kind": kind,
                "display": "pillarbox" if portrait else "letterbox" if wide else "full",
                "start": round(start, 4), "end": round(w.t, 4), "poor": [round(start, 4), round(t_trans, 4)],
                "transition": [round(t_trans, 4), round(t_good, 4)], "good": [round(t_good, 4), round(w.t, 4)],
                "framing": how})
            # B-roll of the photo just shot, heavily blurred, under a caption
            narration(src, True, float(rng.uniform(1.5, 2.0)))
    finally:
        w.close()
    return {"video_id": path.stem, "file": path.name, "fps": FPS, "size": list(size), "codec": ext_codec,
            "duration": round(w.t, 4), "frames": len(w.labels), "tutorial": True, "events": truth_events,
            "stills": stills, "labels": w.labels}


def make_set(folder: str | Path, videos: int = 8, seed: int = 7) -> list[dict]:
    """``videos`` tutorials (2 or 3 events each) with a ``<id>.json`` truth beside each."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    truths = []
    for i in range(videos):
        rng = np.random.default_rng([seed, i])
        n = 2 + i % 2
        names = [EVENT_PHOTOS[(i + j * 3) % len(EVENT_PHOTOS)] for j in range(n)]
        truth = tutorial(folder / f"lesson{i:02d}.{'mp4' if i % 2 == 0 else 'mkv'}", names, rng, i)
        (folder / f"lesson{i:02d}.json").write_text(json.dumps(truth))
        truths.append(truth)
    return truths


# -- scoring ------------------------------------------------------------------------------------

def frame_label(truth: dict, t: float) -> tuple[str, int]:
    """(kind, event) of the frame shown at time ``t``."""
    i = min(len(truth["labels"]) - 1, max(0, int(math.floor(t * truth["fps"] + 0.01))))
    kind, event = truth["labels"][i]
    return kind, event


def score(pairs: Iterable[dict], truths: dict[str, dict]) -> dict:
    """Event recall and pair precision: a pair is right when its poor frame
    is a ``poor`` frame and its good frame a ``good`` frame of the same event."""
    n, right, hit, wrong = 0, 0, set(), []
    for p in pairs:
        n += 1
        t = truths[p["video_id"]]
        pk, pe = frame_label(t, p["poor_time"])
        gk, ge = frame_label(t, p["good_time"])
        if pk == "poor" and gk == "good" and pe == ge:
            right += 1
            hit.add((p["video_id"], pe))
        else:
            wrong.append({"id": p["id"], "poor": [pk, pe], "good": [gk, ge]})
    events = sum(len(t["events"]) for t in truths.values())
    missed = sorted((v, e["index"]) for v, t in truths.items() for e in t["events"] if (v, e["index"]) not in hit)
    return {"events": events, "recovered": len(hit), "recall": len(hit) / max(1, events), "pairs": n,
            "right": right, "precision": right / n if n else 1.0, "wrong": wrong, "missed": missed}


def truths_of(folder: str | Path) -> dict[str, dict]:
    return {t["video_id"]: t for t in (json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json")))}


if __name__ == "__main__":  # python tests/tutorial_videos.py <folder> [videos]
    import sys

    made = make_set(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8)
    print(json.dumps([{k: t[k] for k in ("video_id", "duration", "frames")} for t in made]))

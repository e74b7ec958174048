"""Small synthetic photography-tutorial videos with their ground truth.

A tutorial is a sequence of *shooting events* separated by narration. Each
event shows a badly framed view of a real photograph under the camera app's
overlays (subtitles, UI, grid lines) with a little hand shake, a transition
(a blur or a cross-fade), then the clean, well framed photo held still for
one to two seconds. Narration segments show a presenter in front of a plain
backdrop, with subtitles. The poor framing comes from
:func:`aesformer.synth.framing_pair`, so every event carries the synth
truth (zoom, tilt, shift, aspect) beside its times.

PyAV writes the files (H.264/AAC mp4 needs no system ffmpeg); containers,
codecs, sizes, audio, .srt subtitles and rotation metadata vary per video.
Everything is deterministic for a seed.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from aesformer.synth import SUBTITLES, draw_overlays, fit, framing_pair

# (container extension, codec) cycled over the videos of a sample set.
FORMATS = (("mp4", "h264"), ("mkv", "h264"), ("webm", "libvpx-vp9"), ("avi", "mpeg4"),
           ("mp4", "mpeg4"), ("mkv", "mpeg4"))
SIZES = ((320, 240), (240, 180), (256, 144), (160, 120), (320, 180), (224, 168))

NARRATION = (
    "Hi everyone, today we fix framing mistakes",
    "Watch what happens when I move",
    "That looks much better already",
    "Let me show you another one",
    "Remember to check the edges",
    "Thanks for watching, see you next time",
)


@dataclass
class VideoSpec:
    """How one video looks: container/codec, display size, fps, rotation
    metadata (degrees counter-clockwise) and whether it has audio/.srt."""

    ext: str = "mp4"
    codec: str = "h264"
    size: tuple[int, int] = (320, 240)
    fps: int = 10
    rotation: int = 0
    audio: bool = False
    srt: bool = False


def available_codec(codec: str) -> str:
    """``codec`` if this PyAV can encode it, else mpeg4 (always built in)."""
    import av

    return codec if codec in av.codecs_available else "mpeg4"


def spec_for(index: int, rng: np.random.Generator) -> VideoSpec:
    """The spec of the ``index``-th sample video: formats and sizes cycle;
    every 4th video (from the 3rd) is rotated; every other one has audio and
    an .srt file."""
    ext, codec = FORMATS[index % len(FORMATS)]
    codec = available_codec(codec)
    if codec == "mpeg4" and ext == "webm":  # webm takes only VP8/VP9/AV1
        ext = "mkv"
    size = SIZES[index % len(SIZES)]
    rotation = 90 if index % 4 == 2 and ext in ("mp4", "mkv") else 0
    return VideoSpec(ext=ext, codec=codec, size=size, fps=10, rotation=rotation,
                     audio=index % 2 == 0 and ext in ("mp4", "mkv"), srt=index % 2 == 0)


# -- frames ---------------------------------------------------------------------------

def _presenter_frame(size: tuple[int, int], hue: tuple[int, int, int], t: float, text: str) -> Image.Image:
    """A presenter in front of a plain backdrop, gently moving, with subtitles."""
    W, H = size
    img = Image.new("RGB", (W, H), hue)
    d = ImageDraw.Draw(img)
    # soft vertical gradient so the backdrop is not perfectly flat
    for y in range(0, H, 4):
        shade = int(18 * y / H)
        d.rectangle([0, y, W, y + 4], fill=tuple(max(0, c - shade) for c in hue))
    bob = 2.0 * math.sin(2 * math.pi * 0.8 * t)
    cx, cy = W * 0.5 + 3 * math.sin(2 * math.pi * 0.3 * t), H * 0.42 + bob
    r = H * 0.13
    d.rectangle([cx - r * 1.6, cy + r * 0.9, cx + r * 1.6, H], fill=(40, 50, 90))
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(225, 185, 160))
    d.ellipse([cx - r * 0.45, cy - r * 0.2, cx - r * 0.25, cy], fill=(30, 30, 30))
    d.ellipse([cx + r * 0.25, cy - r * 0.2, cx + r * 0.45, cy], fill=(30, 30, 30))
    mouth = 0.1 + 0.1 * abs(math.sin(2 * math.pi * 3 * t))
    d.ellipse([cx - r * 0.3, cy + r * 0.35, cx + r * 0.3, cy + r * (0.35 + mouth)], fill=(120, 40, 40))
    return draw_overlays(img, np.random.default_rng(0), subtitles=True, ui=False, grid=False, text=text)


def _poor_frame(poor_view: Image.Image, size: tuple[int, int], offset: tuple[float, float], text: str,
                ui_seed: int) -> Image.Image:
    """The camera screen: the poor view letterboxed, shaken by ``offset``
    pixels, under subtitles, UI and grid lines."""
    W, H = size
    view = fit(poor_view, size, "contain")
    dx, dy = offset
    shaken = view.transform(view.size, Image.AFFINE, (1, 0, -dx, 0, 1, -dy), resample=Image.BILINEAR)
    return draw_overlays(shaken, np.random.default_rng(ui_seed), subtitles=True, ui=True, grid=True, text=text)


# -- writer ---------------------------------------------------------------------------

class _Writer:
    """Encodes RGB frames (display orientation) and, optionally, audio."""

    def __init__(self, path: Path, spec: VideoSpec):
        import av

        self.spec = spec
        self.container = av.open(str(path), "w")
        s = self.container.add_stream(spec.codec, rate=spec.fps)
        w, h = spec.size if spec.rotation % 180 == 0 else spec.size[::-1]
        s.width, s.height = w, h
        s.pix_fmt = "yuv420p"
        if spec.codec in ("h264", "libx264"):
            s.options = {"crf": "18", "preset": "veryfast"}
        elif spec.codec.startswith("libvpx"):
            s.options = {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}
        else:
            s.bit_rate = 2_000_000
        if spec.rotation:
            s.set_display_rotation(spec.rotation)
        self.video = s
        self.audio = None
        if spec.audio:
            self.audio = self.container.add_stream("aac", rate=16000)
            self.audio.layout = "mono"

    def frame(self, image: Image.Image) -> None:
        import av

        arr = np.asarray(image.convert("RGB"))
        if self.spec.rotation:
            # stored frames are turned so that a player rotating by the
            # metadata (counter-clockwise) shows them upright
            arr = np.ascontiguousarray(np.rot90(arr, k=-(self.spec.rotation // 90)))
        for p in self.video.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
            self.container.mux(p)

    def write_audio(self, samples: np.ndarray) -> None:
        import av

        if self.audio is None:
            return
        n = 1024
        for k in range(0, len(samples), n):
            chunk = samples[k:k + n].astype(np.float32)
            if len(chunk) < n:
                chunk = np.pad(chunk, (0, n - len(chunk)))
            fr = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
            fr.sample_rate = 16000
            fr.pts = k
            for p in self.audio.encode(fr):
                self.container.mux(p)

    def close(self) -> None:
        for p in self.video.encode():
            self.container.mux(p)
        if self.audio is not None:
            for p in self.audio.encode():
                self.container.mux(p)
        self.container.close()


def _speech_like(duration: float, spans: Sequence[tuple[float, float]], rng: np.random.Generator,
                 rate: int = 16000) -> np.ndarray:
    """Syllable-modulated voiced tones during ``spans``, silence elsewhere."""
    n = int(duration * rate)
    out = np.zeros(n, np.float32)
    t = np.arange(n) / rate
    f0 = float(rng.uniform(110, 220))
    for a, b in spans:
        m = (t >= a) & (t < b)
        tt = t[m]
        env = 0.5 * (1 + np.sin(2 * np.pi * 4.0 * tt))  # ~4 syllables a second
        voice = sum(np.sin(2 * np.pi * f0 * k * tt) / k for k in (1, 2, 3))
        out[m] = (0.15 * env * voice).astype(np.float32)
    return out


def _srt_time(t: float) -> str:
    ms = int(round(t * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def write_srt(path: Path, cues: Sequence[tuple[float, float, str]]) -> None:
    lines = []
    for i, (a, b, text) in enumerate(cues, 1):
        lines += [str(i), f"{_srt_time(a)} --> {_srt_time(b)}", text, ""]
    path.write_text("\n".join(lines))


def tutorial_video(path: str | Path, photos: Sequence[tuple[str, Image.Image]], rng: np.random.Generator,
                   spec: Optional[VideoSpec] = None, *, video_id: Optional[str] = None) -> dict:
    """Write one tutorial video (one shooting event per photo) and return its
    truth: times of every event (``start``/``end``; ``poor``, ``transition``
    and ``good`` spans inside it), the transition kind, the synth truth of the
    poor framing, the narration spans, subtitles and the file's format."""
    spec = spec or VideoSpec()
    path = Path(path)
    W, H = spec.size
    fps = spec.fps
    dt = 1.0 / fps
    hue = tuple(int(c) for c in rng.integers(60, 200, size=3))
    frames_written = 0
    writer = _Writer(path, spec)
    events, narration, cues = [], [], []

    def now() -> float:
        return frames_written * dt

    def emit(img: Image.Image) -> None:
        nonlocal frames_written
        writer.frame(img)
        frames_written += 1

    def narrate(seconds: float, text: str) -> None:
        start = now()
        for k in range(max(1, round(seconds * fps))):
            emit(_presenter_frame((W, H), hue, now(), text))
        narration.append([round(start, 4), round(now(), 4)])
        cues.append((start, now(), text))

    try:
        narrate(float(rng.uniform(1.5, 2.5)), NARRATION[0])
        for k, (name, photo) in enumerate(photos):
            good, poor_view, truth = framing_pair(photo, rng, good_fraction=float(rng.uniform(0.6, 0.8)),
                                                  good_aspect=W / H)
            good_frame = fit(good, (W, H), "cover")
            tip = SUBTITLES[int(rng.integers(len(SUBTITLES)))]
            ui_seed = int(rng.integers(1 << 30))
            start = now()
            # the poor framing, hand-held
            n_poor = round(float(rng.uniform(2.0, 3.0)) * fps)
            amp = max(1.0, min(W, H) / 80)
            last_poor = None
            for i in range(n_poor):
                off = (float(rng.normal(0, amp)), float(rng.normal(0, amp)))
                last_poor = _poor_frame(poor_view, (W, H), off, tip, ui_seed)
                emit(last_poor)
            t_trans = now()
            kind = "fade" if rng.random() < 0.5 else "blur"
            n_trans = round(float(rng.uniform(0.5, 0.8)) * fps)
            for i in range(n_trans):
                a = (i + 1) / (n_trans + 1)
                if kind == "fade":
                    emit(Image.blend(last_poor, good_frame, a))
                else:
                    # blur the poor view out, switch at the blurriest point, sharpen the good in
                    radius = (1 - abs(2 * a - 1)) * min(W, H) / 25 + 0.5
                    src = last_poor if a < 0.5 else good_frame
                    emit(src.filter(ImageFilter.GaussianBlur(radius)))
            t_good = now()
            n_good = round(float(rng.uniform(1.2, 2.0)) * fps)
            for i in range(n_good):
                emit(good_frame)
            end = now()
            cues.append((start, t_trans, tip))
            events.append({
                "index": k, "photo": name,
                "start": round(start, 4), "end": round(end, 4),
                "poor": [round(start, 4), round(t_trans, 4)],
                "transition": [round(t_trans, 4), round(t_good, 4)],
                "good": [round(t_good, 4), round(end, 4)],
                "transition_kind": kind, "subtitle": tip, "synth": truth,
            })
            last = k == len(photos) - 1
            narrate(float(rng.uniform(1.5, 2.5)), NARRATION[-1] if last else NARRATION[1 + k % 4])
        duration = now()
        if spec.audio:
            writer.write_audio(_speech_like(duration, narration, rng))
    finally:
        writer.close()
    srt_path = None
    if spec.srt:
        srt_path = path.with_suffix(".srt")
        write_srt(srt_path, cues)
    return {
        "video_id": video_id or path.stem, "file": path.name, "container": spec.ext, "codec": spec.codec,
        "size": list(spec.size), "fps": fps, "rotation": spec.rotation, "audio": spec.audio,
        "subtitles": None if srt_path is None else srt_path.name, "duration": round(duration, 4),
        "frames": frames_written, "tutorial": True, "events": events, "narration": narration,
    }


def showcase_video(path: str | Path, photos: Sequence[tuple[str, Image.Image]], rng: np.random.Generator,
                   spec: Optional[VideoSpec] = None, *, video_id: Optional[str] = None) -> dict:
    """A non-tutorial video: a slideshow of clean photos with cross-fades
    (no poor framings, no lessons). Its truth has no events."""
    spec = spec or VideoSpec()
    path = Path(path)
    W, H = spec.size
    writer = _Writer(path, spec)
    n = 0
    try:
        prev = None
        for name, photo in photos:
            img = fit(photo, (W, H), "cover")
            if prev is not None:
                for i in range(5):
                    writer.frame(Image.blend(prev, img, (i + 1) / 6))
                    n += 1
            for i in range(round(float(rng.uniform(2, 3)) * spec.fps)):
                writer.frame(img)
                n += 1
            prev = img
    finally:
        writer.close()
    return {"video_id": video_id or path.stem, "file": path.name, "container": spec.ext, "codec": spec.codec,
            "size": list(spec.size), "fps": spec.fps, "rotation": spec.rotation, "audio": False,
            "subtitles": None, "duration": round(n / spec.fps, 4), "frames": n, "tutorial": False,
            "events": [], "narration": []}


def write_truth(path: str | Path, truth: dict) -> None:
    Path(path).write_text(json.dumps(truth, indent=1))


def sample_set(folder: str | Path, videos: int, seed: int = 0, *, min_events: int = 2, max_events: int = 3,
               showcase: int = 0, ads: int = 0, photo_size: int = 480) -> dict:
    """Write ``videos`` tutorial videos (plus ``showcase`` slideshows and
    ``ads``) into ``folder`` with a ``manifest.jsonl`` (video id, title,
    source, file, subtitle file) and a ``<stem>.json`` truth beside each.
    Deterministic for ``seed``: video k uses its own generator derived from
    (seed, k), so any subset can be regenerated alone. Returns the manifest
    rows and the truths."""
    from aesformer.samples import sample_photos

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    photos = []
    for name, im in sample_photos():
        s = photo_size / max(im.size)
        photos.append((name, im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC)))
    manifest, truths = [], []
    plan = [("tutorial", k) for k in range(videos)] + [("showcase", k) for k in range(showcase)] \
        + [("ad", k) for k in range(ads)]
    for kind, k in plan:
        rng = np.random.default_rng([seed, {"tutorial": 0, "showcase": 1, "ad": 2}[kind], k])
        vid = {"tutorial": f"tut{k:04d}", "showcase": f"show{k:04d}", "ad": f"ad{k:04d}"}[kind]
        if kind == "tutorial":
            spec = spec_for(k, rng)
            n = int(rng.integers(min_events, max_events + 1))
            chosen = [photos[i] for i in rng.permutation(len(photos))[:n]]
            path = folder / f"{vid}.{spec.ext}"
            truth = tutorial_video(path, chosen, rng, spec, video_id=vid)
            title = f"Photo tutorial {k}: {chosen[0][0]} framing tips"
        else:
            spec = VideoSpec(ext="mp4", codec=available_codec("h264"), size=(240, 180))
            chosen = [photos[i] for i in rng.permutation(len(photos))[:3]]
            path = folder / f"{vid}.{spec.ext}"
            truth = showcase_video(path, chosen, rng, spec, video_id=vid)
            title = f"Portfolio showcase {k}" if kind == "showcase" else f"Sponsored: camera sale {k}"
        truth["kind"] = kind
        write_truth(path.with_suffix(".json"), truth)
        truths.append(truth)
        manifest.append({"video_id": vid, "title": title, "source": "synthetic", "file": path.name,
                         "subtitles": truth.get("subtitles")})
    with open(folder / "manifest.jsonl", "w") as f:
        for row in manifest:
            f.write(json.dumps(row) + "\n")
    return {"manifest": manifest, "truths": truths}


def broken_files(folder: str | Path, good_video: str | Path) -> dict[str, str]:
    """Broken inputs for testing quarantine, written into ``folder``:
    {file name: what is wrong}. ``good_video`` (an mp4) is the source of the
    corrupt and truncated copies."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = Path(good_video).read_bytes()
    rng = np.random.default_rng(123)
    out = {}
    (folder / "broken_empty.mp4").write_bytes(b"")
    out["broken_empty.mp4"] = "empty"
    (folder / "broken_text.mp4").write_text("This is not a video, just a note somebody renamed.\n" * 20)
    out["broken_text.mp4"] = "text file named .mp4"
    (folder / "broken_truncated.mp4").write_bytes(data[: len(data) // 2])
    out["broken_truncated.mp4"] = "truncated mp4"
    corrupt = bytearray(data[:64]) + bytearray(rng.integers(0, 256, size=max(4096, len(data) - 64), dtype=np.uint8).tobytes())
    (folder / "broken_corrupt.mkv").write_bytes(bytes(corrupt))
    out["broken_corrupt.mkv"] = "corrupt (header then noise)"
    return out

"""Stage 1, ingest: list the inputs, read the manifest, hash, dedupe, probe.

Nothing here raises on a bad file: every problem becomes a *reject*, a row
``{video_id, path, stage, reason, detail}`` that the job writes to its
rejects table, and the job goes on with the other videos.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

DEFAULT_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")


@dataclass
class VideoEntry:
    video_id: str
    path: str
    title: str = ""
    source: str = ""
    subtitles: Optional[str] = None  # path of an .srt file, if any
    content_hash: Optional[str] = None
    size_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def reject(video_id: Optional[str], path: Optional[str], stage: str, reason: str, detail: str = "") -> dict:
    """One row of the rejects table."""
    return {"video_id": video_id, "path": None if path is None else str(path), "stage": stage,
            "reason": reason, "detail": detail[:500]}


# -- listing ------------------------------------------------------------------------

def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Rows of a manifest: JSON lines or CSV with columns video_id, title,
    source, file (or path), subtitles (optional). Relative file names are
    resolved against the manifest's folder."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = []
    for r in rows:
        file = r.get("file") or r.get("path")
        if file and not os.path.isabs(file):
            file = str(path.parent / file)
        subs = r.get("subtitles") or r.get("subtitle_file")
        if subs and not os.path.isabs(subs):
            subs = str(path.parent / subs)
        out.append({"video_id": r.get("video_id") or r.get("id"), "title": r.get("title") or "",
                    "source": r.get("source") or "", "file": file, "subtitles": subs or None})
    return out


def list_inputs(input: str | os.PathLike | Sequence[str], manifest: Optional[str] = None,
                extensions: Iterable[str] = DEFAULT_EXTENSIONS) -> tuple[list[VideoEntry], list[dict]]:
    """(videos, rejects) from a folder (searched recursively; a
    ``manifest.jsonl`` in it is used when no manifest is given), a text file
    of paths (one a line), a manifest (.jsonl/.csv) or a list of paths.

    In a folder, files with other extensions (truth JSON, .srt, …) are not
    videos and are ignored; a file named explicitly (list or manifest) that
    is missing or of another type is rejected. Videos without a manifest row
    get their file stem as id; an .srt file with the same stem is their
    subtitle file.
    """
    exts = tuple(e.lower() for e in extensions)
    rejects: list[dict] = []
    named: list[tuple[str, Optional[dict]]] = []  # (path, manifest row)
    if isinstance(input, (list, tuple)):
        named = [(str(p), None) for p in input]
    else:
        p = Path(input).expanduser()
        if p.is_dir():
            if manifest is None and (p / "manifest.jsonl").exists():
                manifest = str(p / "manifest.jsonl")
            named = [(str(f), None) for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in exts]
        elif p.suffix.lower() in (".jsonl", ".csv"):
            manifest = manifest or str(p)
        elif p.is_file() and p.suffix.lower() in exts:
            named = [(str(p), None)]
        elif p.is_file():
            base = p.parent
            for line in p.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    named.append((line if os.path.isabs(line) else str(base / line), None))
        else:
            raise FileNotFoundError(f"vcmp input '{input}' is not a folder, a list file or a manifest")
    rows_by_file: dict[str, dict] = {}
    if manifest is not None:
        for row in read_manifest(manifest):
            if not row["file"]:
                rejects.append(reject(row["video_id"], None, "ingest", "manifest row without a file"))
                continue
            rows_by_file[os.path.realpath(row["file"])] = row
        if not named:
            named = [(r["file"], r) for r in rows_by_file.values()]
    entries: list[VideoEntry] = []
    for path, row in named:
        row = row or rows_by_file.get(os.path.realpath(path))
        f = Path(path)
        vid = (row or {}).get("video_id") or f.stem
        if not f.is_file():
            rejects.append(reject(vid, path, "ingest", "missing file"))
            continue
        if f.suffix.lower() not in exts:
            rejects.append(reject(vid, path, "ingest", "unsupported file type", f.suffix or "(no extension)"))
            continue
        subs = (row or {}).get("subtitles")
        if not subs and f.with_suffix(".srt").exists():
            subs = str(f.with_suffix(".srt"))
        entries.append(VideoEntry(video_id=str(vid), path=str(f.resolve()), title=(row or {}).get("title", ""),
                                  source=(row or {}).get("source", ""), subtitles=subs,
                                  size_bytes=f.stat().st_size))
    return entries, rejects


def content_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of the file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def dedupe(entries: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(kept, rejects): the first entry (by video id, then path) of each video
    id and of each content hash is kept; the others are rejected naming the
    one they repeat. Entries are dicts with video_id, path, content_hash."""
    kept, rejects = [], []
    by_id: dict[str, dict] = {}
    by_hash: dict[str, dict] = {}
    for e in sorted(entries, key=lambda e: (e["video_id"], e["path"])):
        if e["video_id"] in by_id:
            rejects.append(reject(e["video_id"], e["path"], "dedupe", "duplicate video id",
                                  f"same id as {by_id[e['video_id']]['path']}"))
            continue
        h = e.get("content_hash")
        if h and h in by_hash:
            rejects.append(reject(e["video_id"], e["path"], "dedupe", "duplicate content",
                                  f"same bytes as video {by_hash[h]['video_id']}"))
            continue
        by_id[e["video_id"]] = e
        if h:
            by_hash[h] = e
        kept.append(e)
    return kept, rejects


# -- probing ------------------------------------------------------------------------

class ProbeError(Exception):
    """A file that cannot be used, with a short reason and a detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def probe(path: str | os.PathLike, check_tail: bool = True, min_duration_s: float = 0.0,
          max_duration_s: float = float("inf")) -> dict:
    """Open a video with PyAV and check that it decodes: its first frame and,
    with ``check_tail``, a frame near its end. Returns {duration, fps, width,
    height (display orientation), rotation, codec, container, has_audio,
    frames}; raises :class:`ProbeError` naming what is wrong."""
    import av

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ProbeError("missing file", str(e)) from None
    if size == 0:
        raise ProbeError("empty file", "0 bytes")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except Exception as e:  # PyAV raises InvalidDataError, ValueError, OSError …
        raise ProbeError("not a readable video container", f"{type(e).__name__}: {e}") from None
    try:
        if not container.streams.video:
            raise ProbeError("no video stream", f"streams: {[s.type for s in container.streams]}")
        v = container.streams.video[0]
        if v.codec_context is None or not v.codec_context.name:
            raise ProbeError("unsupported codec", "no decoder")
        fps = float(v.average_rate or v.guessed_rate or 0) or None
        duration = None
        if v.duration is not None and v.time_base is not None:
            duration = float(v.duration * v.time_base)
        if not duration and container.duration:
            duration = container.duration / 1_000_000
        try:
            first = next(container.decode(video=0))
        except StopIteration:
            raise ProbeError("no decodable frames", "the video stream is empty") from None
        except Exception as e:
            raise ProbeError("cannot decode", f"{type(e).__name__}: {e}") from None
        rotation = int(getattr(first, "rotation", 0) or 0) % 360
        w, h = first.width, first.height
        if rotation in (90, 270):
            w, h = h, w
        if not duration:
            raise ProbeError("unknown duration", "neither the stream nor the container gives one")
        if check_tail and duration > 1.0:
            t = max(0.0, duration * 0.9)
            try:
                container.seek(int(t / v.time_base), stream=v, backward=True)
                tail = next(container.decode(video=0), None)
            except Exception as e:
                raise ProbeError("truncated or corrupt", f"no frame near {t:.1f}s: {type(e).__name__}: {e}") from None
            if tail is None:
                raise ProbeError("truncated or corrupt", f"no frame near {t:.1f}s of {duration:.1f}s")
        if duration < min_duration_s:
            raise ProbeError("too short", f"{duration:.1f}s < {min_duration_s}s")
        if duration > max_duration_s:
            raise ProbeError("too long", f"{duration:.1f}s > {max_duration_s}s")
        return {"duration": float(duration), "fps": fps or 0.0, "width": int(w), "height": int(h),
                "rotation": rotation, "codec": v.codec_context.name, "container": container.format.name,
                "has_audio": bool(container.streams.audio), "frames": int(v.frames or 0)}
    finally:
        container.close()

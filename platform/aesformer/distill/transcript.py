"""The transcript of a pair's segment: what the tutor says while the shot is made.

Sources, first one that has it wins:

1. ``input``: the pair row already carries a transcript;
2. ``subtitle_file``: an .srt / .vtt file beside the video (or named in the
   VCMP manifest), the cues overlapping the segment;
3. ``subtitle_track``: a subtitle stream inside the video file;
4. ``asr``: speech recognition of the segment's audio with Whisper through
   transformers (:class:`WhisperTranscriber`; the job runs it in a Ray actor
   pool);
5. nothing: the transcript stays empty and ``reason`` says why (the source
   video is not reachable, it has neither subtitles nor audio, the pair has no
   segment times).

The pair rows carry ``video_id`` and the segment's times; the video file and
its subtitle file are found through :class:`VideoLocator` (VCMP's manifest or
input folder, read with VCMP's own :func:`aesformer.vcmp.ingest.list_inputs`).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
WHISPER_WINDOW_S = 30.0  # Whisper reads 30 s of audio at a time


@dataclass
class Cue:
    start: float
    end: float
    text: str


# -- subtitles ------------------------------------------------------------------------

_TIME_RE = re.compile(r"(?:(\d+):)?(\d{1,2}):(\d{2})[,.](\d{1,3})")
_ARROW_RE = re.compile(r"(\S+)\s*-->\s*(\S+)")
_TAG_RE = re.compile(r"<[^>]+>|\{\\[^}]*\}")  # <i>…</i>, <c.yellow>, {\an8}


def _seconds(stamp: str) -> Optional[float]:
    m = _TIME_RE.fullmatch(stamp.strip())
    if not m:
        return None
    h, mi, s, ms = m.groups()
    return int(h or 0) * 3600 + int(mi) * 60 + int(s) + int(ms.ljust(3, "0")) / 1000.0


def clean_text(text: str) -> str:
    """Subtitle text without markup, on one line."""
    return " ".join(_TAG_RE.sub("", text).split())


def parse_subtitles(text: str) -> list[Cue]:
    """Cues of an SRT or WebVTT document (numbering, styles and notes ignored)."""
    cues: list[Cue] = []
    for block in re.split(r"\r?\n\s*\r?\n", text.replace("\ufeff", "")):
        lines = [ln for ln in block.strip().splitlines()]
        for i, line in enumerate(lines):
            m = _ARROW_RE.search(line)
            if not m:
                continue
            a, b = _seconds(m.group(1)), _seconds(m.group(2))
            if a is None or b is None:
                break
            body = clean_text(" ".join(lines[i + 1:]))
            if body:
                cues.append(Cue(a, b, body))
            break
    return cues


def read_subtitle_file(path: str | os.PathLike) -> list[Cue]:
    return parse_subtitles(Path(path).read_text(encoding="utf-8", errors="replace"))


def embedded_subtitles(video: str | os.PathLike) -> Optional[list[Cue]]:
    """Cues of the first text subtitle stream of a video file; None when it has none."""
    import av

    with av.open(str(video), metadata_errors="ignore") as container:
        if not container.streams.subtitles:
            return None
        stream = container.streams.subtitles[0]
        cues: list[Cue] = []
        for packet in container.demux(stream):
            if packet.size == 0 or packet.pts is None:
                continue
            tb = float(packet.time_base or stream.time_base)
            start = packet.pts * tb
            end = start + (packet.duration or 0) * tb
            texts = []
            try:
                for sub in packet.decode():
                    items = sub if isinstance(sub, Iterable) and not hasattr(sub, "dialogue") else [sub]
                    for item in items:
                        raw = getattr(item, "dialogue", None) or getattr(item, "text", None)
                        if isinstance(raw, bytes):
                            raw = raw.decode("utf-8", "replace")
                        if raw:
                            texts.append(raw.replace("\\N", " "))
            except (av.error.FFmpegError, ValueError):
                texts = [bytes(packet).decode("utf-8", "replace")]
            body = clean_text(" ".join(texts))
            if body:
                cues.append(Cue(start, end, body))
        return cues


def segment_text(cues: Sequence[Cue], start: float, end: float) -> str:
    """The text of the cues overlapping [start, end), in order, repeats merged."""
    out: list[str] = []
    for c in sorted(cues, key=lambda c: c.start):
        if c.end > start and c.start < end and (not out or out[-1] != c.text):
            out.append(c.text)
    return " ".join(out)


# -- audio -------------------------------------------------------------------------

def has_audio(video: str | os.PathLike) -> bool:
    import av

    try:
        with av.open(str(video), metadata_errors="ignore") as c:
            return bool(c.streams.audio)
    except Exception:
        return False


def segment_audio(video: str | os.PathLike, start: float, end: float, rate: int = SAMPLE_RATE) -> Optional[np.ndarray]:
    """Mono float32 samples at ``rate`` Hz for [start, end) of the video's
    first audio stream; None when it has none."""
    import av

    with av.open(str(video), metadata_errors="ignore") as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        if start > 0 and stream.time_base:
            container.seek(int(start / float(stream.time_base)), stream=stream, backward=True)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks: list[np.ndarray] = []
        t0: Optional[float] = None
        for frame in container.decode(stream):
            if frame.time is not None and frame.time >= end:
                break
            for out in resampler.resample(frame):
                if t0 is None:
                    t0 = float(out.time) if out.time is not None else float(frame.time or 0.0)
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    if not chunks:
        return np.zeros(0, np.float32)
    audio = np.concatenate(chunks).astype(np.float32)
    skip = max(0, int(round((start - (t0 or 0.0)) * rate)))
    return audio[skip:skip + max(0, int(round((end - start) * rate)))]


class WhisperTranscriber:
    """Speech recognition with a Whisper checkpoint through transformers."""

    def __init__(self, model_path: str, *, device: str = "cpu", language: Optional[str] = None,
                 max_new_tokens: int = 128):
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.processor = WhisperProcessor.from_pretrained(model_path)
        self.model = WhisperForConditionalGeneration.from_pretrained(model_path).to(device).eval()
        self.device, self.language, self.max_new_tokens = device, language, max_new_tokens
        self._torch = torch

    def transcribe(self, audios: Sequence[np.ndarray], rate: int = SAMPLE_RATE) -> list[str]:
        """One text per audio clip; clips longer than 30 s are read window by window."""
        windows, owner = [], []
        step = int(WHISPER_WINDOW_S * rate)
        for i, a in enumerate(audios):
            a = np.asarray(a, np.float32).reshape(-1)
            if a.size == 0 or float(np.abs(a).max(initial=0.0)) < 1e-4:
                continue  # silence: nothing to say
            for k in range(0, a.size, step):
                windows.append(a[k:k + step])
                owner.append(i)
        texts: list[list[str]] = [[] for _ in audios]
        if windows:
            enc = self.processor.feature_extractor(windows, sampling_rate=rate, return_tensors="pt",
                                                   return_attention_mask=True)
            kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "task": "transcribe"}
            if self.language:
                kwargs["language"] = self.language
            with self._torch.no_grad():
                ids = self.model.generate(enc.input_features.to(self.device),
                                          attention_mask=enc.attention_mask.to(self.device), **kwargs)
            for i, text in zip(owner, self.processor.batch_decode(ids, skip_special_tokens=True)):
                if text.strip():
                    texts[i].append(" ".join(text.split()))
        return [" ".join(t) for t in texts]


# -- where is the video? ---------------------------------------------------------------

class VideoLocator:
    """video_id → (video path, subtitle path), from VCMP's inputs.

    ``sources`` are what VCMP took as input: folders (a ``manifest.jsonl``
    in one is used), manifests (.jsonl/.csv) or list files. Read lazily,
    each once.
    """

    def __init__(self, sources: Iterable[str] = ()):
        self.sources: list[str] = []
        self._index: dict[str, dict] = {}
        self._read: set[str] = set()
        for s in sources:
            self.add(s)

    def add(self, source: Optional[str]) -> None:
        if source and source not in self.sources:
            self.sources.append(str(source))

    def _load(self) -> None:
        from aesformer.vcmp.ingest import list_inputs

        for s in self.sources:
            if s in self._read:
                continue
            self._read.add(s)
            try:
                entries, _ = list_inputs(s)
            except (OSError, ValueError) as e:
                log.warning("cannot list videos in %s: %s", s, e)
                continue
            for e in entries:
                self._index.setdefault(e.video_id, {"video": e.path, "subtitles": e.subtitles})

    def find(self, video_id: Optional[str]) -> Optional[dict]:
        if not video_id:
            return None
        self._load()
        return self._index.get(str(video_id))


def provenance_sources(row: Mapping) -> list[str]:
    """Where the VCMP job that made a row read its videos, from the row's
    provenance (its config as JSON): ``input`` and ``manifest``."""
    prov = row.get("provenance") or {}
    raw = prov.get("config") if isinstance(prov, Mapping) else None
    if not raw:
        return []
    try:
        cfg = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (TypeError, ValueError):
        return []
    if not isinstance(cfg, Mapping):
        return []
    out = []
    for key in ("manifest", "input", "videos"):
        v = cfg.get(key)
        if isinstance(v, str) and v:
            out.append(v)
        elif isinstance(cfg.get("ingest"), Mapping) and isinstance(cfg["ingest"].get(key), str):
            out.append(cfg["ingest"][key])
    if isinstance(cfg.get("source"), Mapping):  # a row distilled before: its source's provenance
        out.extend(provenance_sources({"provenance": cfg["source"]}))
    if isinstance(cfg.get("transcript"), Mapping) and isinstance(cfg["transcript"].get("videos"), str):
        out.append(cfg["transcript"]["videos"])
    return out


def segment_times(row: Mapping) -> Optional[tuple[float, float]]:
    """(start, end) of the pair's segment: the event segment, else poor → good frame times."""
    a, b = row.get("segment_start"), row.get("segment_end")
    if a is None or b is None:
        a, b = row.get("poor_time"), row.get("good_time")
    if a is None or b is None:
        return None
    a, b = float(a), float(b)
    return (a, b) if b > a else (b, a) if a > b else (a, a + 1.0)


def text_transcript(row: Mapping, locator: VideoLocator) -> dict:
    """Everything but speech recognition, for one row.

    Returns ``{"text", "source", "code", "reason"}`` when decided (``code``
    names why there is no text: video_not_found, no_segment_times,
    no_subtitles_no_audio, …), or
    ``{"asr": {"video", "start", "end"}}`` when the audio must be transcribed.
    """
    if (row.get("transcript") or "").strip():
        return {"text": row["transcript"].strip(), "source": "input", "reason": None}
    times = segment_times(row)
    if times is None:
        return {"text": "", "source": None, "code": "no_segment_times", "reason": "the pair has no segment times"}
    found = locator.find(row.get("video_id"))
    if found is None:
        where = (f"looked in {', '.join(locator.sources)}" if locator.sources else
                 "no video folder is known: set transcript.videos=<folder | manifest>")
        return {"text": "", "source": None, "code": "video_not_found",
                "reason": f"source video '{row.get('video_id')}' not found ({where})"}
    start, end = times
    subs = found.get("subtitles")
    if subs and Path(subs).is_file():
        text = segment_text(read_subtitle_file(subs), start, end)
        if text:
            return {"text": text, "source": "subtitle_file", "reason": None}
    video = found["video"]
    if not Path(video).is_file():
        return {"text": "", "source": None, "code": "video_not_found",
                "reason": f"source video file '{video}' is not reachable"}
    try:
        cues = embedded_subtitles(video)
    except Exception as e:  # a broken container: no subtitles from it
        log.warning("cannot read subtitle streams of %s: %s", video, e)
        cues = None
    if cues:
        text = segment_text(cues, start, end)
        if text:
            return {"text": text, "source": "subtitle_track", "reason": None}
    if not has_audio(video):
        return {"text": "", "source": None, "code": "no_subtitles_no_audio",
                "reason": "no subtitles for this segment and no audio track"}
    return {"asr": {"video": video, "start": start, "end": end}}


def transcript_key(row: Mapping, found: Optional[dict], asr_model: str) -> str:
    """Cache key of a segment's transcript: the video file (path, size, mtime),
    the segment and the ASR model."""
    from aesformer.distill.cache import content_hash

    stat = None
    if found:
        try:
            st = os.stat(found["video"])
            stat = [found["video"], st.st_size, int(st.st_mtime)]
        except OSError:
            stat = [found["video"]]
    return content_hash(b"transcript", row.get("video_id"), segment_times(row), stat, asr_model,
                        (row.get("transcript") or "").strip())


def gather_transcripts(rows: Sequence[Mapping], locator: VideoLocator, cache: Any, *, enabled: bool = True,
                       asr: Optional[Any] = None, asr_model: str = "") -> list[dict]:
    """``{"text", "source", "reason"}`` for each row, cached per segment.

    ``asr``, when given, is called once with the list of (video, start, end)
    segments that need speech recognition and returns ``[{"text"} |
    {"error"}]`` in order (the job passes its Whisper actor pool).
    """
    results: list[Optional[dict]] = [None] * len(rows)
    need: list[tuple[int, str, dict]] = []
    for i, row in enumerate(rows):
        given = (row.get("transcript") or "").strip()
        if not enabled:
            results[i] = {"text": given, "source": "input" if given else None, "code": None if given else "disabled",
                          "reason": None if given else "transcripts are disabled (transcript.enabled=false)"}
            continue
        for s in provenance_sources(row):
            locator.add(s)
        found = locator.find(row.get("video_id")) if not given else None
        key = transcript_key(row, found, asr_model if asr is not None else "")
        hit = cache.transcript(key)
        if hit is not None:
            results[i] = hit
            continue
        try:
            r = text_transcript(row, locator)
        except Exception as e:  # an unreadable subtitle file or container
            r = {"text": "", "source": None, "code": "unreadable",
                 "reason": f"cannot read the transcript: {type(e).__name__}: {e}"}
        if "asr" in r:
            if asr is None:
                r = {"text": "", "source": None, "code": "asr_off",
                     "reason": "no subtitles for this segment and speech recognition is off (transcript.asr=false)"}
            else:
                need.append((i, key, r["asr"]))
                continue
        cache.put_transcript(key, r)
        results[i] = r
    if need:
        outs = asr([(a["video"], a["start"], a["end"]) for _, _, a in need])
        for (i, key, _), o in zip(need, outs):
            if o.get("error"):
                r = {"text": "", "source": None, "code": "asr_failed", "reason": o["error"]}
            else:
                text = o.get("text") or ""
                r = {"text": text, "source": "asr", "code": None if text else "asr_empty",
                     "reason": None if text else "speech recognition heard nothing"}
            cache.put_transcript(key, r)
            results[i] = r
    return [r or {"text": "", "source": None, "code": "not_processed", "reason": "not processed"} for r in results]

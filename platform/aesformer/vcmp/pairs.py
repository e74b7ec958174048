"""Stage 6 and 10 pieces: choosing good frames, coarse pairs, ids, split,
transcripts.

The first sampled frame of a segment is the poor image of every good frame
in it (the paper's rule). A segment whose first frame is itself judged good
has nothing to fix and gives no pair.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Optional, Sequence


def choose_good_frames(frames: Sequence[dict], max_per_segment: int, min_gap_s: float,
                       min_after_poor_s: float) -> tuple[list[int], dict[int, str]]:
    """(chosen indices in time order, {index: why a good frame was not chosen}).

    ``frames``: dicts with ``t``, ``good`` (bool) and ``vlm``/``sharpness``
    scores; frame 0 is the poor frame. Good frames are ranked by VLM score,
    then sharpness; each chosen one is at least ``min_gap_s`` from the
    others (near-duplicates of a held photo add nothing). A frame marked
    ``same_view`` (it shows the poor frame's own view: nothing improved,
    see :func:`aesformer.vcmp.align.view_change`) is never chosen; its
    reason is ``view["reason"]``."""
    skipped: dict[int, str] = {}
    if not frames:
        return [], skipped
    if frames[0].get("good"):
        return [], {i: "segment starts with a good frame: nothing to fix" for i, f in enumerate(frames) if f.get("good")}
    t0 = frames[0]["t"]
    cands = []
    for i, f in enumerate(frames[1:], 1):
        if not f.get("good"):
            continue
        if f.get("same_view"):
            skipped[i] = f["view"]["reason"]
            continue
        if f["t"] - t0 < min_after_poor_s:
            skipped[i] = f"only {f['t'] - t0:.1f}s after the poor frame"
            continue
        cands.append(i)
    cands.sort(key=lambda i: (-(frames[i].get("vlm") or 0.0), -(frames[i].get("sharpness") or 0.0), frames[i]["t"]))
    chosen: list[int] = []
    for i in cands:
        if len(chosen) >= max_per_segment:
            skipped[i] = f"segment already has {max_per_segment} pairs"
        elif any(abs(frames[i]["t"] - frames[j]["t"]) < min_gap_s for j in chosen):
            skipped[i] = f"within {min_gap_s}s of a chosen good frame"
        else:
            chosen.append(i)
    return sorted(chosen, key=lambda i: frames[i]["t"]), skipped


def pair_id(video_id: str, segment_index: int, good_time: float) -> str:
    """Deterministic id: the same video, segment and good frame give the same
    id on every run (how a resumed run skips what it wrote)."""
    return f"{video_id}-s{segment_index:03d}-t{int(round(good_time * 1000)):07d}"


def video_split(video_id: str, test_fraction: float, salt: str = "aesrecon") -> str:
    """"test" for a stable ``test_fraction`` of video ids (by hash), else
    "train": all pairs of a video share its split, and adding videos never
    moves an existing one."""
    h = int(hashlib.sha256(f"{salt}\x00{video_id}".encode()).hexdigest()[:15], 16) / float(16 ** 15)
    return "test" if h < test_fraction else "train"


_SRT_TIME = re.compile(r"(\d+):(\d+):(\d+)[,.](\d+)\s*-->\s*(\d+):(\d+):(\d+)[,.](\d+)")


def read_srt(path: Optional[str]) -> list[tuple[float, float, str]]:
    """(start, end, text) cues of an .srt file; [] when missing or unreadable."""
    if not path or not Path(path).is_file():
        return []
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    cues = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.strip().splitlines()
        for k, line in enumerate(lines):
            m = _SRT_TIME.search(line)
            if m:
                g = [int(x) for x in m.groups()]
                a = g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 1000
                b = g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 1000
                cues.append((a, b, " ".join(l.strip() for l in lines[k + 1:] if l.strip())))
                break
    return cues


def transcript(cues: Sequence[tuple[float, float, str]], start: float, end: float, context_s: float = 2.0) -> str:
    """Subtitle text overlapping [start - context, end] (what was said about the event)."""
    return " ".join(text for a, b, text in cues if b > start - context_s and a < end).strip()

"""Make small synthetic photography-tutorial videos from real photographs.

Each video has two or three shooting events (a badly framed view under
subtitles, camera UI and grid lines, a blur or cross-fade, then the clean
good photo held still) with narration between them; containers, codecs,
sizes, audio tracks, .srt files and rotation metadata vary. Beside every
video, ``<stem>.json`` holds its ground truth (event times, the synth truth
of each poor framing); ``manifest.jsonl`` lists them for VCMP.

    python jobs/make_samples.py output=runs/samples videos=12
"""
from __future__ import annotations

if __package__ in (None, ""):
    import _prelude  # noqa: F401  (makes aesformer importable when run as a script)

import logging
import time
from dataclasses import dataclass

from aesformer.config import JobConfig
from aesformer.job import run_job

log = logging.getLogger("make_samples")


@dataclass
class MakeSamplesConfig(JobConfig):
    output: str = "runs/samples"
    # tutorial videos to write
    videos: int = 12
    min_events: int = 2
    max_events: int = 3
    # non-tutorial videos VCMP must screen out
    showcase: int = 0
    ads: int = 0
    # add broken files (empty, text, truncated, corrupt) for quarantine demos
    broken: bool = False
    # longest side of the source photographs before framing, pixels
    photo_size: int = 480


def run(cfg: MakeSamplesConfig) -> dict:
    """Writes the videos, their truth files and manifest.jsonl into cfg.output."""
    from pathlib import Path

    from aesformer.videos import broken_files, sample_set

    t0 = time.perf_counter()
    out = sample_set(cfg.output, cfg.videos, cfg.seed, min_events=cfg.min_events, max_events=cfg.max_events,
                     showcase=cfg.showcase, ads=cfg.ads, photo_size=cfg.photo_size)
    broken = {}
    if cfg.broken and out["manifest"]:
        first = next((m for m in out["manifest"] if m["file"].endswith(".mp4")), out["manifest"][0])
        broken = broken_files(cfg.output, Path(cfg.output) / first["file"])
    events = sum(len(t["events"]) for t in out["truths"])
    log.info("wrote %d videos with %d events to %s in %.1fs", len(out["truths"]), events, cfg.output,
             time.perf_counter() - t0)
    return {"output": cfg.output, "videos_dir": cfg.output, "videos": [m["file"] for m in out["manifest"]],
            "events": events,
            "manifest": str(Path(cfg.output) / "manifest.jsonl"), "broken": broken}


def main(argv=None) -> dict:
    return run_job(MakeSamplesConfig, "make_samples", run, argv)


if __name__ == "__main__":
    main()

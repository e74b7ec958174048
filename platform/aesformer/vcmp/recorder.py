"""The driver's end of VCMP's stream: every finished segment row becomes
its AesRecon pairs and frame readings, written as it arrives; a video is
recorded as finished in the state log only once everything it produced
sits in finished shards, so a kill at any moment loses nothing the log
claims and duplicates nothing."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

from aesformer.progress import DETAIL, Progress

log = logging.getLogger("vcmp")


def pair_rows(row: dict, data: dict, cfg: Any, cues: list, provenance: dict) -> list[dict]:
    """The AesRecon rows of one finished segment row (its surviving pairs)."""
    from aesformer.data import make_pair
    from aesformer.vcmp.pairs import transcript, video_split

    out = []
    frames = data.get("frames", [])
    edit = data.get("poor_edit") or {}
    poor_index = edit.get("image") if edit.get("image") is not None else (frames[0]["image"] if frames else None)
    split = video_split(row["video_id"], cfg.split.test_fraction, cfg.split.salt)
    for p in data.get("pairs", []):
        if p.get("dropped") is not None:
            continue
        good = frames[p["good"]]
        decisions = list(p.get("decisions", []))
        if edit.get("status"):
            decisions.append({"stage": "overlay_edit", "decision": edit["status"],
                              "reason": json.dumps(edit.get("attempts", []))})
        out.append(make_pair(
            p["id"], bytes(row["images"][poor_index]), bytes(row["images"][good["image"]]),
            video_id=row["video_id"], segment_start=row["start"], segment_end=row["end"],
            poor_time=frames[0]["t"], good_time=good["t"], transcript=transcript(cues, row["start"], row["end"]) or None,
            split=split, scores={k: float(v) for k, v in p["scores"].items() if v is not None},
            decisions=decisions, provenance=provenance))
    return out


class Recorder:
    """The driver's end of the stream: writes each segment row's pairs and
    frame readings as it arrives, and records a video in the state log only
    once everything it produced sits in finished shards (so a kill at any
    moment loses nothing that the log claims, and duplicates nothing)."""

    def __init__(self, out: Path, cfg: Any, state):
        from aesformer.data import ShardWriter, make_provenance
        from aesformer.vcmp import rows as R

        self.cfg, self.state = cfg, state
        from aesformer import storage

        # a local folder or a URI
        self.pairs = ShardWriter(storage.join(out, "pairs"), shard_rows=cfg.shard_rows)
        self.frames = ShardWriter(storage.join(out, "frames"), R.FRAME_SCHEMA, shard_rows=cfg.shard_rows * 16,
                                  prefix="frames")
        self.provenance = make_provenance("vcmp", cfg)
        self.pending: dict[str, dict] = {}  # video id → progress while its rows arrive
        self.waiting: list[dict] = []  # finished videos whose rows are not all durable yet
        self.finished = 0
        self.pair_count = 0
        self.progress: Optional[Progress] = None

    def add(self, row: dict, total: int) -> None:
        from aesformer.vcmp import rows as R
        from aesformer.vcmp.pairs import read_srt
        from aesformer.vcmp.report import merge_stats, segment_stats

        vid, data = row["video_id"], R.info(row)
        prog = self.pending.get(vid)
        if prog is None:  # the video's first row: read its subtitles once
            prog = self.pending[vid] = {
                "video_id": vid, "path": row["path"], "content_hash": data.get("content_hash"), "status": "done",
                "screen": data.get("screen"), "stats": {}, "pairs": [], "frames": [], "seen": 0,
                "cues": read_srt(row["subtitles"])}
        if row["kind"] == "video":  # stopped before segmentation
            expected = 1
            if data.get("error"):
                prog["status"], prog["error"] = "failed", data["error"]["reason"]
            elif not (data.get("screen") or {}).get("keep", False):
                prog["status"] = "screened_out"
        else:
            expected = row["n_segments"]
            prog["stats"] = merge_stats(prog["stats"], segment_stats(data))
            for fr in R.frame_rows(row, data):
                self.frames.write(fr)
                prog["frames"].append(fr["id"])
            for pr in pair_rows(row, data, self.cfg, prog["cues"], self.provenance):
                self.pairs.write(pr)
                prog["pairs"].append(pr["id"])
        prog["seen"] += 1
        if prog["seen"] >= expected:
            rec = {k: v for k, v in self.pending.pop(vid).items() if k not in ("seen", "cues")}
            rec["frames"] = [i for i in rec["frames"] if i not in self.frames.done_ids]  # only those still buffered
            rec["finished_at"] = time.monotonic()
            self.waiting.append(rec)
            self.finished += 1
            self.pair_count += len(rec["pairs"])
            log.info("[%d/%d] %s: %s, %d pairs", self.finished, total, vid, rec["status"], len(rec["pairs"]),
                     extra=DETAIL)
            if self.progress is not None:
                self.progress.set(self.finished, f"{self.pair_count} pairs", total=total)
        self.settle()

    def settle(self) -> None:
        if self.waiting and time.monotonic() - self.waiting[0]["finished_at"] >= self.cfg.checkpoint_s:
            # a video has waited long enough for its shards to fill: write them short
            self.pairs.flush()
            self.frames.flush()
        durable, waiting = [], []
        for v in self.waiting:
            done = self.pairs.done_ids.issuperset(v["pairs"]) and self.frames.done_ids.issuperset(v["frames"])
            (durable if done else waiting).append(v)
        if durable:
            self.state.append({k: v for k, v in r.items() if k not in ("frames", "finished_at")} for r in durable)
            self.waiting = waiting

    def close(self) -> None:
        self.pairs.close()
        self.frames.close()
        self.settle()

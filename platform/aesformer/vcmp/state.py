"""Resumable progress of a VCMP run: an append-only log of finished videos.

``<output>/state/videos.jsonl`` gets one line per video once everything it
produced is durable (its pairs in finished shards, or it had none), and one
line per rejected file. A rerun reads it and skips those videos; a video
whose line is missing (the run died first) is simply mined again, and the
pair writer skips the ids it already holds, so nothing is duplicated or lost.
At a URI (``s3://...``) the log is one object, rewritten whole at each append.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable


class RunState:
    def __init__(self, output: str | os.PathLike):
        from aesformer import storage

        self.uri = storage.is_uri(output)
        self.folder = storage.join(output, "state") if self.uri else Path(output) / "state"
        storage.makedirs(self.folder)
        self.path = storage.join(self.folder, "videos.jsonl") if self.uri else self.folder / "videos.jsonl"

    def records(self) -> list[dict]:
        """Every record, in order (a torn last line from a crash is ignored)."""
        from aesformer import storage

        if not storage.exists(self.path):
            return []
        out = []
        for line in storage.read_text(self.path).splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def finished(self) -> dict[str, dict]:
        """{video_id: latest record} of videos that finished (not rejects)."""
        return {r["video_id"]: r for r in self.records() if r.get("status") != "rejected"}

    def rejects(self) -> list[dict]:
        """The latest reject row per path (one row per broken file, however
        many runs saw it), without those that later finished."""
        latest: dict[str, dict] = {}
        records = self.records()
        done_paths = {r.get("path") for r in records if r.get("status") != "rejected"}
        for r in records:
            if r.get("status") == "rejected" and r.get("path") not in done_paths:
                latest[r.get("path") or r.get("video_id")] = r["reject"]
        return list(latest.values())

    def append(self, records: Iterable[dict]) -> None:
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        if not lines:
            return
        if self.uri:
            from aesformer import storage

            old = storage.read_text(self.path) if storage.exists(self.path) else ""
            storage.write_text(self.path, old + lines)
            return
        with open(self.path, "a") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

"""The distillation cache: a SQLite file under the job's output folder.

Plans are keyed by the pair's content (poor and good image bytes, the
transcript) and the teacher's and validator's settings, so a rerun pays for
nothing already decided, and a run interrupted at any point resumes where it
stopped: every attempt is committed as it finishes (SQLite transactions with
a write-ahead log and full sync survive a crash mid-write), and a pair whose
rounds were cut short continues from its last recorded round.

Tables:
  attempts(key, round, record)          every teacher reply and its verdict
  outcomes(key, pair_id, status, record) accepted | rejected | failed
  measurements(key, record)             the measured change of a pair
  transcripts(key, record)              a segment's transcript and its source
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

FINAL = ("accepted", "rejected")  # outcomes a rerun does not redo; "failed" is retried


def content_hash(*parts: Any) -> str:
    """sha256 over the parts (bytes as they are, anything else as canonical JSON)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, (bytes, bytearray, memoryview)):
            data = bytes(p)
        else:
            data = json.dumps(p, sort_keys=True, default=str).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def plan_key(poor_bytes: bytes, good_bytes: bytes, transcript: str, settings: dict) -> str:
    """The cache key of a pair's plan under the given teacher/validator settings."""
    return content_hash(b"plan", poor_bytes, good_bytes, transcript or "", settings)


class PlanCache:
    """See the module docstring. One process writes it (the job's driver)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS attempts (key TEXT NOT NULL, round INTEGER NOT NULL, pair_id TEXT,
                superseded INTEGER NOT NULL DEFAULT 0, created REAL, record TEXT NOT NULL);
            CREATE INDEX IF NOT EXISTS attempts_key ON attempts(key);
            CREATE TABLE IF NOT EXISTS outcomes (key TEXT PRIMARY KEY, pair_id TEXT, status TEXT NOT NULL,
                created REAL, record TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS measurements (key TEXT PRIMARY KEY, record TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS transcripts (key TEXT PRIMARY KEY, record TEXT NOT NULL);
            """
        )

    # -- writes: each one its own committed transaction ------------------------------
    def _write(self, sql: str, args: tuple) -> None:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute(sql, args)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def add_attempt(self, key: str, pair_id: str, round_: int, record: dict) -> None:
        self._write("INSERT INTO attempts (key, round, pair_id, created, record) VALUES (?, ?, ?, ?, ?)",
                    (key, int(round_), pair_id, time.time(), json.dumps(record, default=str)))

    def finish(self, key: str, pair_id: str, status: str, record: dict) -> None:
        self._write("INSERT OR REPLACE INTO outcomes (key, pair_id, status, created, record) VALUES (?, ?, ?, ?, ?)",
                    (key, pair_id, status, time.time(), json.dumps(record, default=str)))

    def restart(self, key: str) -> None:
        """Start a pair over (after a transport failure): its attempts stay on
        record but no longer count as rounds."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("UPDATE attempts SET superseded = 1 WHERE key = ?", (key,))
            self.db.execute("DELETE FROM outcomes WHERE key = ?", (key,))
            self.db.execute("COMMIT")

    def put_measurement(self, key: str, record: dict) -> None:
        self._write("INSERT OR REPLACE INTO measurements (key, record) VALUES (?, ?)", (key, json.dumps(record)))

    def put_transcript(self, key: str, record: dict) -> None:
        self._write("INSERT OR REPLACE INTO transcripts (key, record) VALUES (?, ?)", (key, json.dumps(record)))

    # -- reads ------------------------------------------------------------------------
    def _one(self, sql: str, args: tuple) -> Optional[tuple]:
        with self._lock:
            return self.db.execute(sql, args).fetchone()

    def outcome(self, key: str) -> Optional[dict]:
        """{"status", "record"} of a decided pair, or None."""
        row = self._one("SELECT status, record FROM outcomes WHERE key = ?", (key,))
        return None if row is None else {"status": row[0], "record": json.loads(row[1])}

    def attempts(self, key: str, include_superseded: bool = False) -> list[dict]:
        with self._lock:
            rows = self.db.execute(
                "SELECT record FROM attempts WHERE key = ? " + ("" if include_superseded else "AND superseded = 0 ")
                + "ORDER BY round, rowid", (key,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def measurement(self, key: str) -> Optional[dict]:
        row = self._one("SELECT record FROM measurements WHERE key = ?", (key,))
        return None if row is None else json.loads(row[0])

    def transcript(self, key: str) -> Optional[dict]:
        row = self._one("SELECT record FROM transcripts WHERE key = ?", (key,))
        return None if row is None else json.loads(row[0])

    def all_attempts(self) -> Iterator[dict]:
        """Every attempt ever recorded, oldest first, with its key and pair id."""
        with self._lock:
            rows = self.db.execute("SELECT key, pair_id, round, superseded, created, record FROM attempts "
                                   "ORDER BY rowid").fetchall()
        for key, pid, rnd, sup, created, rec in rows:
            yield {"key": key, "pair_id": pid, "round": rnd, "superseded": bool(sup), "created": created,
                   **json.loads(rec)}

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self.db.execute("SELECT status, COUNT(*) FROM outcomes GROUP BY status").fetchall()
        return {s: n for s, n in rows}

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def __enter__(self) -> "PlanCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Judge verdicts, aesthetic scores and human votes in one SQLite file
(``<output>/evaluation.db``), written by one process (the job's driver or
the rating server). A verdict is keyed by (comparison, order) and a score by
(scorer, system, photo, seed): a rerun finds them and asks nothing twice.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Optional

SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    key TEXT NOT NULL, ord TEXT NOT NULL, system TEXT NOT NULL, photo TEXT NOT NULL, seed INTEGER NOT NULL,
    reference TEXT NOT NULL, verdict TEXT, outcome TEXT, raw TEXT, error TEXT, failures TEXT,
    requests INTEGER, judge TEXT, created REAL, PRIMARY KEY (key, ord));
CREATE TABLE IF NOT EXISTS scores (
    scorer TEXT NOT NULL, system TEXT NOT NULL, photo TEXT NOT NULL, seed INTEGER NOT NULL, value REAL,
    created REAL, PRIMARY KEY (scorer, system, photo, seed));
CREATE TABLE IF NOT EXISTS votes (
    rater TEXT NOT NULL, pair TEXT NOT NULL, left_image TEXT NOT NULL, right_image TEXT NOT NULL,
    choice TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (rater, pair));
"""


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        self.db.executescript(SCHEMA)
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    def _rows(self, sql: str, args: Iterable[Any] = ()) -> list[dict]:
        with self._lock:
            cur = self.db.execute(sql, tuple(args))
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, r)) for r in cur.fetchall()]

    # -- verdicts ------------------------------------------------------------------
    def verdict_keys(self) -> set[tuple[str, str]]:
        return {(r["key"], r["ord"]) for r in self._rows("SELECT key, ord FROM verdicts")}

    def put_verdict(self, rec: dict) -> None:
        row = dict(rec)
        if not isinstance(row.get("failures"), str):
            row["failures"] = json.dumps(row.get("failures") or [])
        row.setdefault("created", time.time())
        cols = ["key", "ord", "system", "photo", "seed", "reference", "verdict", "outcome", "raw", "error",
                "failures", "requests", "judge", "created"]
        with self._lock:
            self.db.execute(f"INSERT OR REPLACE INTO verdicts ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                            [row.get(c) for c in cols])
            self.db.commit()

    def verdicts(self) -> list[dict]:
        rows = self._rows("SELECT * FROM verdicts ORDER BY key, ord")
        for r in rows:
            r["failures"] = json.loads(r["failures"] or "[]")
        return rows

    # -- scores --------------------------------------------------------------------
    def score_keys(self) -> set[tuple[str, str, str, int]]:
        return {(r["scorer"], r["system"], r["photo"], r["seed"])
                for r in self._rows("SELECT scorer, system, photo, seed FROM scores")}

    def put_scores(self, rows: Iterable[dict]) -> None:
        with self._lock:
            self.db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?)",
                                [(r["scorer"], r["system"], r["photo"], int(r["seed"]), r["value"], time.time())
                                 for r in rows])
            self.db.commit()

    def scores(self) -> list[dict]:
        return self._rows("SELECT scorer, system, photo, seed, value FROM scores ORDER BY scorer, system, photo, seed")

    # -- human votes ---------------------------------------------------------------
    def voted_pairs(self, rater: str) -> set[str]:
        return {r["pair"] for r in self._rows("SELECT pair FROM votes WHERE rater = ?", [rater])}

    def put_vote(self, rater: str, pair: str, left: str, right: str, choice: str) -> bool:
        """Store one vote; False (and nothing stored) when the rater already voted on the pair."""
        with self._lock:
            cur = self.db.execute("INSERT OR IGNORE INTO votes VALUES (?, ?, ?, ?, ?, ?)",
                                  (rater, pair, left, right, choice, time.time()))
            self.db.commit()
            return cur.rowcount == 1

    def votes(self) -> list[dict]:
        return self._rows("SELECT * FROM votes ORDER BY created")


def open_store(output: str | Path, name: str = "evaluation.db") -> Store:
    return Store(Path(output) / name)


def vote_outcome(vote: dict, output_image: str = "output") -> Optional[str]:
    """The system's outcome from a human vote: ``choice`` is left, right or tie."""
    if vote["choice"] == "tie":
        return "tie"
    chosen = vote["left_image"] if vote["choice"] == "left" else vote["right_image"]
    return "win" if chosen == output_image else "loss"

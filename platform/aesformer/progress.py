"""One progress line per long phase: count, rate and ETA.

On a terminal it is a bar redrawn in place; elsewhere (a log file, CI, a
``ray job submit`` console) it is a plain line at most every ``every_s``
seconds and at the end, so a long phase neither floods nor goes silent.

Ray Train workers report through :func:`report` (a small queue owned by
the driver) and the driver draws: the console shows one line per phase
rather than one per worker.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, Optional

log = logging.getLogger("aesformer.progress")

# ``log.info(..., extra=DETAIL)``: a per-item line for the log file; the
# console shows it only with log_level=debug
DETAIL = {"detail": True}


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def describe(done: int, total: Optional[int], elapsed: float, unit: str, note: str = "") -> str:
    """``12/40 videos (30%) · 1.5 videos/s · ETA 19s · <note>``."""
    rate = done / elapsed if elapsed > 0 else 0.0
    parts = [f"{done}/{total} {unit}" + (f" ({100 * done / total:.0f}%)" if total else "") if total is not None
             else f"{done} {unit}"]
    if rate > 0:
        parts.append(f"{rate:.2f} {unit}/s" if rate < 10 else f"{rate:.0f} {unit}/s")
        if total:
            parts.append(f"ETA {_duration((total - done) / rate)}" if done < total else f"took {_duration(elapsed)}")
    if note:
        parts.append(note)
    return " · ".join(parts)


class Progress:
    """``with Progress("sft", total=276, unit="steps") as p: p.update(1)``."""

    def __init__(self, name: str, total: Optional[int] = None, unit: str = "items", every_s: float = 15.0,
                 stream: Any = None, start: int = 0):
        self.name, self.total, self.unit, self.every_s = name, total, unit, every_s
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done, self.note = start, ""
        self._first: Optional[int] = None
        self._t_first = 0.0
        self._start = start
        self._t0 = time.perf_counter()
        self._last = 0.0
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, note: Optional[str] = None) -> None:
        self.set(self.done + n, note)

    def set(self, done: int, note: Optional[str] = None, total: Optional[int] = None) -> None:
        with self._lock:
            self.done = done
            if note is not None:
                self.note = note
            if total is not None:
                self.total = total
            now = time.perf_counter()
            if self._first is None:  # the rate counts from the first report: start-up is not progress
                self._first, self._t_first = done, now
            if self.tty or now - self._last >= self.every_s:
                self._last = now
                self._draw(final=False)

    def line(self) -> str:
        now = time.perf_counter()
        text = describe(self.done - self._start, None if self.total is None else self.total - self._start,
                        now - self._t0, self.unit, self.note)
        if self._first is not None and self.done > self._first and (self.total is None or self.done < self.total):
            # rate and ETA from the reports so far, not from the phase's start-up
            rate = (self.done - self._first) / max(1e-9, now - self._t_first)
            count = text.split(" · ")[0]
            tail = [part for part in text.split(" · ")[1:] if not part.endswith("/s") and not part.startswith("ETA")]
            parts = [count, f"{rate:.2f} {self.unit}/s" if rate < 10 else f"{rate:.0f} {self.unit}/s"]
            if self.total:
                parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
            text = " · ".join(parts + tail)
        elif self._first is not None and self.done == self._first and (self.total is None or self.done < self.total):
            text = " · ".join(part for part in text.split(" · ") if not part.endswith("/s") and not part.startswith("ETA"))
        return f"{self.name}: {text}"

    def _draw(self, final: bool) -> None:
        text = self.line()
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
            self.stream.flush()
        else:
            log.info(text)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._draw(final=True)


class RemoteProgress:
    """The driver's end of a progress queue that Ray workers write to.

    ``with RemoteProgress("sft", total, "steps") as rp:`` pass ``rp.queue``
    to the workers, who call :func:`report`; a driver thread draws."""

    def __init__(self, name: str, total: Optional[int] = None, unit: str = "steps", every_s: float = 15.0):
        from ray.util.queue import Queue

        # no CPU: it must never wait for a slot the training workers hold
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.progress = Progress(name, total, unit, every_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)

    def __enter__(self) -> "RemoteProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._pull()
        self.progress.close()
        try:
            self.queue.shutdown()
        except Exception:  # the queue dies with the cluster anyway
            pass

    def _pull(self) -> None:
        try:
            items = self.queue.get_nowait_batch(self.queue.qsize())
        except Exception:
            return
        for item in items:
            self.progress.set(item.get("done", self.progress.done), item.get("note"), item.get("total"))

    def _drain(self) -> None:
        while not self._stop.wait(1.0):
            self._pull()


def report(queue: Any, done: int, total: Optional[int] = None, note: Optional[str] = None) -> None:
    """A worker's progress, sent without waiting; a full or gone queue is ignored."""
    if queue is None:
        return
    try:
        queue.put_nowait({"done": done, "total": total, "note": note})
    except Exception:
        pass

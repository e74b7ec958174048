"""Model stages of Ray Data jobs: every call has a deadline, every pool a
placement deadline, and both failures name the stage.

VCMP, reconstruction, evaluation and the editor's cache run their models as
Ray Data actor pools (``map_batches`` with a callable class). Each job adds
such a stage with :func:`model_stage` instead of calling ``map_batches``
itself:

- The callable runs on one thread of its own inside the actor, which loads
  the models (in the background, from the actor's start) and then takes one
  batch at a time. The actor waits for each at most ``ray.call_timeout``
  seconds; past it the call fails with :class:`StageTimeout`, naming the
  stage, what ran late and the timeout.
- A thread that hangs (a stuck engine, a collective that never completes)
  cannot be stopped, so that actor's process is replaced: the next call sent
  to it, or at the latest a few seconds later, ends the process, and Ray
  starts a fresh actor (Ray Data's actors restart without limit, and a call
  that was on the lost process runs again on the new one). A replacement
  never holds the stuck thread nor the memory it pinned.
- What happens to the batch that timed out is Ray Data's retry setting: by
  default (``DataContext.max_errored_blocks = 0``, no
  ``actor_task_retry_on_errors``) the job fails with that error. A deadline
  is a stuck engine, not a bad row, so it is not quarantined as one (a
  quarantined video or photo counts as done and a rerun would never retry
  it); every job that uses these stages resumes without redoing finished
  work, so a failed run loses only the batches in flight. A job that would
  rather drop the batch and go on sets ``max_errored_blocks``.
- Because the models load in the background, an actor is ready as soon as it
  is placed. Ray Data waits for each pool's minimum actors at most
  ``ray.placement_timeout`` seconds (``DataContext.wait_for_min_actors_s``);
  iterate the dataset inside :func:`stage_errors` and a pool that cannot be
  placed fails with :class:`StagePlacementError` naming the stage.
- Ray Data's own no-progress guard (``execution_no_progress_timeout_s``) is
  raised above the longest wait a healthy stage may have (loading, then one
  call, each up to the call timeout), so the error that names the stage is the
  one a user sees.
"""
from __future__ import annotations

import logging
import math
import os
import queue
import re
import sys
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

log = logging.getLogger(__name__)

# seconds a process with a stuck thread waits for its next call before it ends itself
REPLACE_AFTER_S = 10.0
# exit status of a process ended because a call on it hung
STUCK_EXIT_CODE = 70

# the stages this process has built: class name -> stage name (for naming a pool Ray Data reports)
_STAGES: dict[str, str] = {}


class StageTimeout(TimeoutError):
    """A call of a Ray Data model stage (or its model loading) ran past ``ray.call_timeout``."""


class StagePlacementError(TimeoutError):
    """A Ray Data model stage could not start its minimum actors within ``ray.placement_timeout``."""


class _Worker:
    """One daemon thread that runs what it is given, in order. Daemon: a stuck
    one never keeps the process from exiting."""

    def __init__(self, name: str):
        self._jobs: "queue.Queue[tuple[Future, Callable, tuple, dict]]" = queue.Queue()
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def _loop(self) -> None:
        while True:
            future, fn, args, kwargs = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to the caller
                future.set_exception(e)

    def submit(self, fn: Callable, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future


class DeadlineStage:
    """The base of the class :func:`model_stage` makes for a stage's callable
    class (``stage_fn``): the same constructor arguments and calls, each under
    the stage's deadline."""

    stage: str = "stage"
    stage_fn: Any = None
    call_timeout: Optional[float] = None

    def __init__(self, *args: Any, **kwargs: Any):
        self._stuck: Optional[str] = None
        self._worker = _Worker(f"stage-{self.stage}")
        self._fn = None
        self._loading = self._worker.submit(self.stage_fn, *args, **kwargs)

    def _wait(self, future: Future, what: str) -> Any:
        try:
            return future.result(timeout=self.call_timeout)
        except FutureTimeout:
            self._stuck = what
            log.error("stage '%s': %s did not finish within %.0fs; this actor's process is replaced",
                      self.stage, what, self.call_timeout)
            timer = threading.Timer(REPLACE_AFTER_S, self._replace_process)
            timer.daemon = True
            timer.start()
            raise StageTimeout(
                f"stage '{self.stage}' ({self.stage_fn.__name__}): {what} did not finish within "
                f"{self.call_timeout:g}s (ray.call_timeout={self.call_timeout:g}); a stuck model or collective is "
                f"the usual cause. The actor's process is replaced; raise ray.call_timeout if the stage is just "
                f"slow") from None

    def _replace_process(self) -> None:
        log.error("stage '%s': ending this actor's process (%s hung on a thread that cannot be stopped); "
                  "Ray starts a fresh one", self.stage, self._stuck)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(STUCK_EXIT_CODE)

    def __call__(self, batch: Any) -> Any:
        if self._stuck is not None:  # a fresh process takes this call (Ray retries it there)
            self._replace_process()
        if self._fn is None:
            self._fn = self._wait(self._loading, "loading its models")
        return self._wait(self._worker.submit(self._fn, batch), "a call on a batch")


def deadline_class(fn: type, stage: str, call_timeout: Optional[float]) -> type:
    """A class named as ``fn`` (Ray Data names the operator after it) whose
    calls run ``fn``'s under the deadline; ``call_timeout`` None: no deadline."""
    if not isinstance(fn, type) or not callable(getattr(fn, "__call__", None)):
        raise TypeError(f"stage '{stage}': a model stage takes a callable class, got {fn!r}")
    if call_timeout is not None and call_timeout <= 0:
        raise ValueError(f"stage '{stage}': ray.call_timeout must be positive, got {call_timeout}")
    _STAGES[fn.__name__] = stage
    return type(fn.__name__, (DeadlineStage,), {
        "stage": stage, "stage_fn": fn, "call_timeout": None if call_timeout is None else float(call_timeout),
        "__module__": __name__, "__qualname__": fn.__qualname__, "__doc__": fn.__doc__})


def model_stage(dataset: Any, stage: str, fn: type, timeouts: Any, **map_batches: Any) -> Any:
    """``dataset.map_batches(fn, **map_batches)`` as a model stage: ``fn``'s
    calls under ``timeouts.call_timeout``, its pool's start under
    ``timeouts.placement_timeout`` (``timeouts``: the job's ``ray`` config).
    Returns the new dataset."""
    call_timeout = getattr(timeouts, "call_timeout", None)
    placement_timeout = getattr(timeouts, "placement_timeout", None)
    out = dataset.map_batches(deadline_class(fn, stage, call_timeout), **map_batches)
    ctx = out.context  # shared by the whole chain of this pipeline, not the process's default
    if placement_timeout:
        ctx.wait_for_min_actors_s = max(1, math.ceil(placement_timeout))
    guard = getattr(ctx, "execution_no_progress_timeout_s", -1)
    if call_timeout and guard is not None and guard > 0:
        ctx.execution_no_progress_timeout_s = max(guard, 2 * call_timeout + (placement_timeout or 0) + 60)
    return out


def _starting_operator(error: BaseException) -> Optional[str]:
    """The name of the Ray Data operator whose start raised ``error``, read
    from the tracebacks of the error and the ones it was raised from (Ray
    Data's message does not say, and it drops the error's own traceback)."""
    import traceback

    seen: set[int] = set()
    todo: list[Optional[BaseException]] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        for frame, _ in traceback.walk_tb(e.__traceback__):
            op = frame.f_locals.get("self")
            if frame.f_code.co_name == "start" and op is not None and hasattr(op, "name"):
                try:
                    return str(op.name)
                except Exception:
                    break
        todo += [e.__context__, e.__cause__]
    return None


def stage_of(operator: Optional[str]) -> Optional[str]:
    """The stage of a Ray Data operator name such as ``Map(load)->MapBatches(ThinkerPool)``."""
    for cls in re.findall(r"MapBatches\((\w+)\)", operator or ""):
        if cls in _STAGES:
            return _STAGES[cls]
    return None


@contextmanager
def stage_errors(timeouts: Any = None) -> Iterator[None]:
    """Around the iteration of a dataset with model stages: Ray Data's
    timeout on a pool's start becomes :class:`StagePlacementError` naming the
    stage (``timeouts``: the job's ``ray`` config, for the message)."""
    from ray.exceptions import GetTimeoutError

    try:
        yield
    except GetTimeoutError as e:
        if "starting actors" not in str(e):
            raise
        operator = _starting_operator(e)
        stage = stage_of(operator)
        wait = getattr(timeouts, "placement_timeout", None)
        named = (f"stage '{stage}' ({operator})" if stage else
                 f"operator {operator}" if operator else f"one of the stages {', '.join(sorted(set(_STAGES.values())))}")
        raise StagePlacementError(
            f"{named}: its actor pool could not start its minimum actors"
            f"{f' within {wait:g}s (ray.placement_timeout)' if wait else ''}: the cluster has no room for them "
            f"(the other stages' pools hold the rest, or no node has what one actor asks). Lower the stage's pool "
            f"size or resources, or add nodes") from e

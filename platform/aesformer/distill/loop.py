"""The feedback loop: teacher proposes, validator checks, failures go back.

Round-synchronous over a batch of pairs, so a local engine sees whole
batches: in each round every pair still open gets one proposal; the
validator checks them all; accepted plans are final, rejected ones return
to the teacher with the validator's feedback, up to ``max_rounds`` rounds;
then the pair is rejected with the reason of its last round. Every attempt
is committed to the cache the moment it is judged, so an interrupted run
resumes mid-pair.

Outcomes: ``accepted``; ``rejected`` (final: the plan never held);
``failed`` (the teacher or judge could not be reached in any round: a later
run tries again). The spending cap or an endpoint refusing us stops the
loop; the pairs it interrupts stay open, nothing finished is lost.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from aesformer.distill.cache import PlanCache
from aesformer.distill.chat import Reply
from aesformer.distill.teachers import PairTask
from aesformer.distill.validator import TRANSIENT, Validator, Verdict

log = logging.getLogger(__name__)


@dataclass
class LoopResult:
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> pairs
    failed: Counter = field(default_factory=Counter)
    rounds: Counter = field(default_factory=Counter)  # rounds used -> decided pairs
    attempts: int = 0
    open: int = 0  # pairs the loop left undecided (it was stopped)
    stopped: Optional[str] = None  # why the job must stop, if it must

    def merge(self, other: "LoopResult") -> None:
        self.accepted += other.accepted
        self.rejected.update(other.rejected)
        self.failed.update(other.failed)
        self.rounds.update(other.rounds)
        self.attempts += other.attempts
        self.open += other.open
        self.stopped = self.stopped or other.stopped


def resume_task(task: PairTask, cache: PlanCache) -> PairTask:
    """Load the task's earlier rounds from the cache (a run cut short mid-pair)."""
    attempts = cache.attempts(task.key)
    task.rounds_done = len(attempts)
    task.history = [{"round": a["round"], "text": a.get("text"), "feedback": a.get("feedback")}
                    for a in attempts if a.get("text") is not None and not a.get("ok") and a.get("feedback")]
    return task


def _attempt_record(task: PairTask, teacher_kind: str, reply: Reply, verdict: Verdict) -> dict:
    return {
        "pair_id": task.pair_id, "round": task.round, "teacher": teacher_kind, "text": reply.text,
        "error": reply.error, "ok": verdict.ok, "reason": verdict.reason, "feedback": verdict.feedback,
        "checks": verdict.checks, "judge": verdict.judge,
        "usage": {"requests": reply.requests, "prompt_tokens": reply.prompt_tokens,
                  "completion_tokens": reply.completion_tokens, "seconds": round(reply.seconds, 4)},
    }


def feedback_loop(tasks: Sequence[PairTask], teacher: Any, validator: Validator, cache: PlanCache, *,
                  max_rounds: int = 3, on_attempt: Optional[Callable[[dict], None]] = None) -> LoopResult:
    """Run the rounds for ``tasks`` (already resumed from the cache) until
    each is decided or the loop must stop; see the module docstring."""
    result = LoopResult()
    active = [t for t in tasks]
    while active and not result.stopped:
        replies = teacher.propose(active)
        verdicts = validator.validate(active, replies)
        still: list[PairTask] = []
        for task, reply, verdict in zip(active, replies, verdicts):
            stop = reply.stopped or verdict.stopped
            if stop:
                # not an attempt: the request was never answered (cap reached, endpoint gone)
                result.stopped = result.stopped or (reply.error if reply.stopped else
                                                    (verdict.judge or {}).get("error")) or stop
                result.open += 1
                continue
            record = _attempt_record(task, teacher.kind, reply, verdict)
            cache.add_attempt(task.key, task.pair_id, task.round, record)
            result.attempts += 1
            if on_attempt is not None:
                on_attempt(record)
            rnd = task.round
            task.rounds_done = rnd
            if verdict.ok:
                cache.finish(task.key, task.pair_id, "accepted", {
                    "pair_id": task.pair_id, "plan": verdict.plan, "rounds": rnd, "teacher": teacher.kind,
                    "judge_score": (verdict.judge or {}).get("score"), "transcript": task.transcript,
                })
                result.accepted += 1
                result.rounds[rnd] += 1
                continue
            if reply.text is not None and verdict.feedback and verdict.reason not in TRANSIENT:
                task.history.append({"round": rnd, "text": reply.text, "feedback": verdict.feedback})
            last_round = rnd >= max_rounds or (not teacher.retries_help and verdict.reason not in TRANSIENT)
            if not last_round:
                still.append(task)
                continue
            status = "failed" if verdict.reason in TRANSIENT else "rejected"
            detail = verdict.feedback or (verdict.checks or {}).get("error") or (verdict.judge or {}).get("error") or ""
            cache.finish(task.key, task.pair_id, status, {
                "pair_id": task.pair_id, "reason": verdict.reason, "feedback": detail, "rounds": rnd,
                "teacher": teacher.kind, "last_text": reply.text, "transcript": task.transcript,
            })
            (result.failed if status == "failed" else result.rejected)[verdict.reason] += 1
            result.rounds[rnd] += 1
        active = still
    result.open += len(active) if result.stopped else 0
    return result

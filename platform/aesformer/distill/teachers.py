"""Teachers: who writes the seven-dimension plan for a (poor, good) pair.

One interface, chosen by config (``teacher.kind``)::

    teacher.settings() -> dict            # what the cache key is made of
    teacher.propose(tasks) -> list[Reply] # one reply per task, in order
    teacher.retries_help                  # does another round change anything?

- ``measured`` (:class:`MeasuredTeacher`): no model; the plan written from the
  measured change (:mod:`aesformer.distill.measured`). Deterministic, free.
- ``openai`` / ``local`` (:class:`ChatTeacher`): a VLM sees the poor photo,
  the good photo and the transcript of the tutor's words, and writes the plan;
  a rejected plan comes back to it with the validator's feedback as the next
  turn of the same conversation. The chat backend is an
  :class:`~aesformer.distill.chat.OpenAIChat` or a local engine pool.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence

from aesformer.actions import format_template
from aesformer.distill.chat import Reply
from aesformer.distill.measured import measure_pair, plan_from_measurement, ratio_name

# Bump when the measured plan's wording or the measurement changes: cached
# plans of the old version are then not reused.
MEASURED_VERSION = "m1"


@dataclass
class PairTask:
    """One pair on its way through the teacher and the validator."""

    key: str  # cache key: content hash + teacher and validator settings
    pair_id: str
    poor: Any  # PIL images
    good: Any
    transcript: str = ""
    measurement: Optional[dict] = None
    # earlier rejected plans with the feedback on them: {"round", "text", "feedback"}
    history: list[dict] = field(default_factory=list)
    rounds_done: int = 0  # attempts so far (a transport failure is a round without a plan)

    @property
    def round(self) -> int:
        """The round the next proposal is (1-based)."""
        return self.rounds_done + 1


class Teacher(Protocol):
    kind: str
    retries_help: bool

    def settings(self) -> dict: ...

    def propose(self, tasks: Sequence[PairTask]) -> list[Reply]: ...


# -- prompts ----------------------------------------------------------------------

TEACHER_INSTRUCTION = (
    "You are an expert photography teacher. The FIRST image is a photo as it was taken (the poor photo); "
    "the SECOND image shows the same scene after the photographer improved how it was captured (the good "
    "photo). Write the plan of actions that turns the first photo into the second, along seven photographic "
    "dimensions from global to local: aspect ratio, framing and composition, camera position and viewpoint, "
    "subject position, subject pose, depth of field and focus, colour and lighting. Be specific and "
    "quantitative where you can (\"crop tighter (zoom in 1.3x)\", \"rotate 4 degrees clockwise to level the "
    "horizon\", \"move the subject left by 10% of the width\"). Describe only changes you can see between the "
    "two photos; where a dimension does not change, say so. Never invent people or objects.\n"
    "Write exactly seven lines in this order, each wrapped in its own tags, and nothing else:\n{format}"
)

FEEDBACK_INSTRUCTION = (
    "A reviewer rejected this plan: {feedback}\n"
    "Write the corrected plan: exactly seven lines, each wrapped in its own tags, in this order, and "
    "nothing else:\n{format}"
)


def measurement_hints(m: Optional[dict]) -> str:
    """A short factual summary of a measurement, for a model teacher's prompt."""
    if not m:
        return ""
    bits = [f"aspect ratio {ratio_name(m['aspect_poor'])} -> {ratio_name(m['aspect_good'])}"]
    if m.get("geometry_ok"):
        bits.append(f"the good photo shows {1 / m['zoom']:.2f}x the linear extent of the scene the poor one shows"
                    if m["zoom"] < 1 else f"the poor photo shows {m['zoom']:.2f}x the linear extent of the good one")
        bits.append(f"poor horizon tilted {abs(m['rotation_deg']):.1f} degrees "
                    f"{'counter-clockwise' if m['rotation_deg'] > 0 else 'clockwise'}")
        bits.append(f"subject offset in the poor frame: {m['shift'][0] * 100:+.0f}% of the width, "
                    f"{m['shift'][1] * 100:+.0f}% of the height")
    bits.append(f"brightness {m['brightness'] * 100:+.0f}%, contrast {m['contrast'] * 100:+.0f}%, "
                f"saturation {m['saturation'] * 100:+.0f}%, colour temperature b* {m['temperature']:+.1f}")
    return "Measured from the pixels (poor -> good): " + "; ".join(bits) + "."


def teacher_prompt(transcript: str = "", measurement: Optional[dict] = None, *, hints: bool = True,
                   instruction: Optional[str] = None) -> str:
    text = (instruction or TEACHER_INSTRUCTION).replace("{format}", format_template())
    extra = []
    if transcript and transcript.strip():
        extra.append(f"What the tutor says during this shot (transcript): \"{' '.join(transcript.split())}\"")
    if hints and measurement:
        extra.append(measurement_hints(measurement))
    return "\n\n".join(extra + [text])


def teacher_conversation(task: PairTask, *, hints: bool = True, instruction: Optional[str] = None) -> list[dict]:
    """The chat for the task's next round: the two photos and the request,
    then each rejected plan and the feedback on it."""
    messages = [{"role": "user", "content": [
        {"type": "image", "image": task.poor},
        {"type": "image", "image": task.good},
        {"type": "text", "text": teacher_prompt(task.transcript, task.measurement, hints=hints,
                                                instruction=instruction)},
    ]}]
    for past in task.history:
        messages.append({"role": "assistant", "content": past.get("text") or ""})
        messages.append({"role": "user", "content": [{"type": "text", "text": FEEDBACK_INSTRUCTION.format(
            feedback=past.get("feedback") or "the plan was not accepted", format=format_template())}]})
    return messages


def _digest(text: Optional[str]) -> Optional[str]:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()[:16]


# -- teachers ----------------------------------------------------------------------

class MeasuredTeacher:
    """Writes the plan from the measured change; no model, no cost."""

    kind = "measured"
    retries_help = False  # the same pair always gets the same plan

    def __init__(self, max_side: int = 480):
        self.max_side = max_side

    def settings(self) -> dict:
        return {"kind": self.kind, "version": MEASURED_VERSION, "max_side": self.max_side}

    def propose(self, tasks: Sequence[PairTask]) -> list[Reply]:
        out = []
        for t in tasks:
            t0 = time.perf_counter()
            if t.measurement is None:
                t.measurement = measure_pair(t.poor, t.good, max_side=self.max_side)
            text = plan_from_measurement(t.measurement).render()
            out.append(Reply(text=text, seconds=time.perf_counter() - t0))
        return out


class ChatTeacher:
    """A VLM teacher behind a chat backend (``openai`` or ``local``)."""

    retries_help = True

    def __init__(self, chat: Any, *, kind: str, temperature: float = 0.7, top_p: float = 0.95, max_tokens: int = 512,
                 seed: Optional[int] = None, hints: bool = True, instruction: Optional[str] = None):
        self.chat, self.kind = chat, kind
        self.sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed}
        self.hints, self.instruction = hints, instruction

    def settings(self) -> dict:
        return {"kind": self.kind, **self.chat.settings(), **self.sampling, "hints": self.hints,
                "measured_version": MEASURED_VERSION if self.hints else None,
                "instruction": _digest(self.instruction)}

    def propose(self, tasks: Sequence[PairTask]) -> list[Reply]:
        convs = [teacher_conversation(t, hints=self.hints, instruction=self.instruction) for t in tasks]
        sampling = dict(self.sampling)
        # a seed per round, so a retry samples a different plan
        by_round: dict[int, list[int]] = {}
        for i, t in enumerate(tasks):
            by_round.setdefault(t.round, []).append(i)
        out: list[Optional[Reply]] = [None] * len(tasks)
        for rnd, idx in by_round.items():
            s = dict(sampling)
            if s.get("seed") is not None:
                s["seed"] = int(s["seed"]) + rnd - 1
            for i, r in zip(idx, self.chat.complete([convs[i] for i in idx], s)):
                out[i] = r
        return [r if r is not None else Reply(error="no reply") for r in out]

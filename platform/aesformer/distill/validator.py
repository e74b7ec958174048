"""The validator: does a teacher's plan hold for its pair?

Checks, in order (the first failure is the verdict's reason):

1. ``unparseable``: the reply is a seven-dimension plan (:meth:`ActionPlan.parse`;
   strict, or ignoring text around the seven blocks).
2. ``incomplete``: every dimension says something (a dimension that does not
   change says so; it is not left empty).
3. ``geometry_conflict``: where the pair was measured, the plan does not ask
   for the opposite of what happened: "crop tighter" when the good image is
   the wider view, "rotate clockwise" when the horizon must turn the other
   way, a wider aspect ratio when it got narrower, the subject moved the
   wrong way. Only clear measured changes are held against the plan.
4. ``judge_rejected`` / ``judge_unreadable``: a judge model (through the same
   two backends as the teachers) rates the plan's consistency with the two
   photos 0–5; its expected score (:func:`aesformer.rewards.expected_score`
   over the digit tokens, or the digit it wrote) must reach ``min_score``.

A failed verdict carries ``feedback``: sentences for the teacher's next round.
``teacher_error`` and ``judge_error`` mark transport failures (the pair is
retried on a later run rather than rejected for good).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from aesformer.actions import DIMENSIONS, ActionPlan, PlanFormatError
from aesformer.distill.chat import Reply
from aesformer.distill.measured import (ASPECT_TOL, ROTATION_TOL, SHIFT_TOL, ZOOM_TOL, directions, ratio_name)
from aesformer.distill.teachers import PairTask, measurement_hints
from aesformer.rewards import ANSWER_INSTRUCTION, MAX_SCORE, SCORE_TOKENS, expected_score

# Reasons a plan fails; the last two are transport failures, not verdicts.
REASONS = ("unparseable", "incomplete", "geometry_conflict", "judge_rejected", "judge_unreadable",
           "teacher_error", "judge_error")
TRANSIENT = ("teacher_error", "judge_error")

# Only changes this many times the "keep" tolerance are held against a plan.
CONFIDENT = 2.0


@dataclass
class Verdict:
    ok: bool
    reason: Optional[str] = None
    feedback: str = ""
    plan: Optional[str] = None  # canonical rendering, when it parsed
    checks: dict = field(default_factory=dict)
    judge: Optional[dict] = None  # score, source, reply text, usage
    stopped: Optional[str] = None  # the judge hit the spending cap / a dead endpoint

    def to_dict(self) -> dict:
        return asdict(self)


# -- what a plan claims -------------------------------------------------------------

_RATIO_RE = re.compile(r"(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)")
_FROM_TO_RE = re.compile(r"from\s+(\d+(?:\.\d+)?\s*:\s*\d+(?:\.\d+)?)\s+(?:to|into)\s+(\d+(?:\.\d+)?\s*:\s*\d+(?:\.\d+)?)",
                         re.IGNORECASE)
_WIDER_RE = re.compile(r"\b(widen|wider|landscape|horizontal|panoramic)\b", re.IGNORECASE)
_NARROWER_RE = re.compile(r"\b(narrow|narrower|taller|portrait|vertical)\b", re.IGNORECASE)
_ZOOM_IN_RE = re.compile(r"\b(crop(?:ping)? (?:in )?tighter|tighter (?:crop|framing|shot)|zoom(?:ing)? in|crop in|"
                         r"(?:move|step|get) closer|closer framing|tighten)\b", re.IGNORECASE)
_ZOOM_OUT_RE = re.compile(r"\b(zoom(?:ing)? out|widen the framing|wider (?:framing|shot|view)|(?:step|move|pull) back|"
                          r"show more of|include more|loosen|looser (?:crop|framing))\b", re.IGNORECASE)
_CW_RE = re.compile(r"(?<![a-z-])(counter[- ]?|anti[- ]?)?clockwise", re.IGNORECASE)
_MOVE_X_RE = re.compile(r"\b(?:move|shift|bring|reposition|slide)\b[^.;]*?\b(left|right)\b", re.IGNORECASE)
_MOVE_Y_RE = re.compile(r"\b(?:move|shift|bring|reposition|slide)\b[^.;]*?\b(up|upwards?|down|downwards?)\b",
                        re.IGNORECASE)


def _ratio_value(text: str) -> Optional[float]:
    m = _RATIO_RE.search(text)
    if not m:
        return None
    a, b = float(m.group(1)), float(m.group(2))
    return a / b if a > 0 and b > 0 else None


def _one(found: set) -> Optional[str]:
    return next(iter(found)) if len(found) == 1 else None


def plan_claims(plan: ActionPlan) -> dict[str, Optional[str]]:
    """The direction each dimension's text asks for (same vocabulary as
    :func:`aesformer.distill.measured.directions`), None where it makes no
    clear claim."""
    claims: dict[str, Optional[str]] = {}
    ratio = plan.ratio
    m = _FROM_TO_RE.search(ratio)
    if m:
        a, b = _ratio_value(m.group(1)), _ratio_value(m.group(2))
        if a and b and abs(b / a - 1) >= ASPECT_TOL:
            claims["aspect"] = "wider" if b > a else "narrower"
        else:
            claims["aspect"] = None
    else:
        found = set()
        if _WIDER_RE.search(ratio):
            found.add("wider")
        if _NARROWER_RE.search(ratio):
            found.add("narrower")
        claims["aspect"] = _one(found)
    comp = plan.composition
    found = set()
    if _ZOOM_IN_RE.search(comp):
        found.add("in")
    if _ZOOM_OUT_RE.search(comp):
        found.add("out")
    claims["zoom"] = _one(found)
    found = set()
    for text in (plan.camera, plan.composition):
        for mm in _CW_RE.finditer(text):
            found.add("counter-clockwise" if mm.group(1) else "clockwise")
    claims["rotation"] = _one(found)
    pos = plan.position
    claims["move_x"] = _one({mm.group(1).lower() for mm in _MOVE_X_RE.finditer(pos)})
    ys = {("up" if mm.group(1).lower().startswith("up") else "down") for mm in _MOVE_Y_RE.finditer(pos)}
    claims["move_y"] = _one(ys)
    return claims


def geometry_conflicts(plan: ActionPlan, m: Optional[dict]) -> list[str]:
    """Sentences naming each clear contradiction between the plan and the
    measured change (empty when they agree or nothing was measured)."""
    if not m:
        return []
    claims, truth = plan_claims(plan), directions(m)
    out = []
    change = m["aspect_good"] / m["aspect_poor"] - 1.0
    if claims["aspect"] and abs(change) >= CONFIDENT * ASPECT_TOL and claims["aspect"] != truth["aspect"]:
        out.append(f"(1) Aspect Ratio asks for a {claims['aspect']} frame, but the good photo's aspect ratio "
                   f"({ratio_name(m['aspect_good'])}) is {truth['aspect']} than the poor one's "
                   f"({ratio_name(m['aspect_poor'])}).")
    if not m.get("geometry_ok"):
        return out
    if claims["zoom"] and abs(m["zoom"] - 1.0) >= CONFIDENT * ZOOM_TOL and claims["zoom"] != truth["zoom"]:
        if truth["zoom"] == "out":
            out.append(f"(2) Framing and Composition says to crop tighter (zoom in), but the good photo is the wider "
                       f"view: it shows {1 / m['zoom']:.2f}x more of the scene, so the framing must widen (zoom out).")
        else:
            out.append(f"(2) Framing and Composition says to widen the framing (zoom out), but the good photo is the "
                       f"tighter crop (zoom in {m['zoom']:.2f}x).")
    if claims["rotation"] and abs(m["rotation_deg"]) >= CONFIDENT * ROTATION_TOL and claims["rotation"] != truth["rotation"]:
        tilt = "counter-clockwise" if m["rotation_deg"] > 0 else "clockwise"
        out.append(f"(3) Camera Position and Viewpoint says to rotate {claims['rotation']}, but the poor photo's "
                   f"horizon is tilted {abs(m['rotation_deg']):.1f}° {tilt}, so it must turn {truth['rotation']}.")
    for axis, k, size in (("move_x", 0, "width"), ("move_y", 1, "height")):
        if claims[axis] and abs(m["shift"][k]) >= CONFIDENT * SHIFT_TOL and claims[axis] != truth[axis]:
            out.append(f"(4) Subject Position says to move the subject {claims[axis]}, but in the good photo it sits "
                       f"{truth[axis]} of where it is in the poor one (by {abs(m['shift'][k]) * 100:.0f}% of the {size}).")
    return out


# -- the judge ----------------------------------------------------------------------

JUDGE_RUBRIC = (
    "You check a photo-editing plan against two photos of the same scene. The FIRST image is the photo as it "
    "was taken (poor); the SECOND is the improved photo (good). The plan should say how to turn the first into "
    "the second along seven dimensions: aspect ratio, framing and composition, camera position and viewpoint, "
    "subject position, subject pose, depth of field and focus, colour and lighting.\n"
    "Judge whether the plan agrees with what really changed between the two photos (the crop and aspect "
    "ratio, the tilt, where the subject sits, the pose, the focus, the colour), whether it covers every "
    "dimension, and whether it invents nothing that is not in the photos.\n"
    "Scale:\n"
    "5 - every change is described correctly and nothing is invented\n"
    "4 - correct, one minor change missing or vague\n"
    "3 - mostly correct, one key change missing or wrong\n"
    "2 - several changes missing or wrong\n"
    "1 - barely related to the two photos\n"
    "0 - contradicts the photos, invents things, or is not a plan\n"
)


def judge_conversation(task: PairTask, plan_text: str) -> list[dict]:
    text = f"Plan:\n{plan_text}\n\nHow well does this plan describe the change from the first photo to the second (0-5)? " \
           f"{ANSWER_INSTRUCTION}"
    if task.transcript and task.transcript.strip():
        text = f"The tutor's words during this shot: \"{' '.join(task.transcript.split())}\"\n\n" + text
    return [{"role": "user", "content": [
        {"type": "text", "text": JUDGE_RUBRIC + "\nPoor photo:"},
        {"type": "image", "image": task.poor},
        {"type": "text", "text": "Good photo:"},
        {"type": "image", "image": task.good},
        {"type": "text", "text": text},
    ]}]


def score_from_logprobs(logprobs: dict[str, float]) -> Optional[float]:
    """E[score]/5 from {token: logprob} over the digits present (others count as
    impossible); None when no digit is there."""
    vals = {d: logprobs[d] for d in SCORE_TOKENS if d in logprobs and math.isfinite(logprobs[d])}
    if not vals:
        # tokenizers may report a digit with a leading space
        vals = {d: v for t, v in logprobs.items() if (d := t.strip()) in SCORE_TOKENS and math.isfinite(v)}
    if not vals:
        return None
    return expected_score([vals.get(d, -math.inf) for d in SCORE_TOKENS])


_DIGIT_RE = re.compile(r"(?<![\d.])([0-5])(?![\d.])")


def score_from_text(text: Optional[str]) -> Optional[float]:
    """The first digit 0–5 standing alone in the reply, divided by 5."""
    m = _DIGIT_RE.search((text or "")[:200])
    return None if m is None else int(m.group(1)) / MAX_SCORE


class Judge:
    """A judge model behind a chat backend: local backends are read from the
    digit tokens' log-probs (one forward pass); remote ones from the
    top_logprobs of the first token when the endpoint sends them, else from
    the digit in the reply."""

    def __init__(self, chat: Any, *, max_tokens: int = 8, top_logprobs: int = 20):
        self.chat, self.max_tokens, self.top_logprobs = chat, max_tokens, top_logprobs

    def settings(self) -> dict:
        return {**self.chat.settings(), "max_tokens": self.max_tokens}

    def rate(self, tasks: Sequence[PairTask], plans: Sequence[str]) -> list[dict]:
        """[{score (0..1 or None), source, text, reply}] per (task, plan)."""
        convs = [judge_conversation(t, p) for t, p in zip(tasks, plans)]
        if not convs:
            return []
        if callable(getattr(self.chat, "score", None)):
            # one forward pass: the log-probs of the six digits as the first token
            replies = self.chat.score(convs, SCORE_TOKENS)
        else:
            replies = self.chat.complete(convs, {"temperature": 0.0, "top_p": 1.0, "max_tokens": self.max_tokens},
                                         top_logprobs=self.top_logprobs)
        results = []
        for r in replies:
            score, source = None, None
            if not r.error:
                if r.first_logprobs:
                    score = score_from_logprobs(r.first_logprobs)
                    source = "logprobs" if score is not None else None
                if score is None and r.text:
                    score = score_from_text(r.text)
                    source = "text" if score is not None else None
            results.append({"score": score, "source": source, "text": r.text, "reply": r})
        return results


# -- the validator ---------------------------------------------------------------------

class Validator:
    """Rules, the measured geometry and an optional judge; see the module doc."""

    def __init__(self, judge: Optional[Judge] = None, *, min_score: float = 0.6, check_geometry: bool = True,
                 strict_format: bool = False):
        self.judge, self.min_score = judge, float(min_score)
        self.check_geometry, self.strict_format = check_geometry, strict_format

    def settings(self) -> dict:
        return {"judge": None if self.judge is None else self.judge.settings(), "min_score": self.min_score,
                "check_geometry": self.check_geometry, "strict_format": self.strict_format}

    def check_rules(self, task: PairTask, text: str) -> Verdict:
        """Format, coverage and geometry, without the judge."""
        try:
            plan = ActionPlan.parse(text, strict=self.strict_format)
        except PlanFormatError as e:
            return Verdict(False, "unparseable", f"The reply is not a valid seven-dimension plan: {e}.",
                           checks={"format": str(e), "problem": e.problem})
        canonical = plan.render()
        empty = [d for d in DIMENSIONS if not plan[d.key].strip() or plan[d.key].strip(" .") in ("", "...")]
        if empty:
            names = ", ".join(d.label.rstrip(":") for d in empty)
            return Verdict(False, "incomplete", f"These dimensions are empty: {names}. Say what to change in each, "
                           f"or that it stays as it is.", plan=canonical, checks={"empty": [d.key for d in empty]})
        checks: dict[str, Any] = {"format": "ok"}
        if self.check_geometry and task.measurement:
            checks["claims"] = plan_claims(plan)
            conflicts = geometry_conflicts(plan, task.measurement)
            checks["geometry"] = conflicts or "agrees"
            if conflicts:
                return Verdict(False, "geometry_conflict", " ".join(conflicts), plan=canonical, checks=checks)
        return Verdict(True, plan=canonical, checks=checks)

    def validate(self, tasks: Sequence[PairTask], replies: Sequence[Reply]) -> list[Verdict]:
        verdicts: list[Verdict] = []
        for t, r in zip(tasks, replies):
            if r.text is None:
                verdicts.append(Verdict(False, "teacher_error", "", checks={"error": r.error}, stopped=r.stopped))
            else:
                verdicts.append(self.check_rules(t, r.text))
        if self.judge is None:
            return verdicts
        todo = [i for i, v in enumerate(verdicts) if v.ok]
        rated = self.judge.rate([tasks[i] for i in todo], [verdicts[i].plan for i in todo])
        for i, res in zip(todo, rated):
            v, reply = verdicts[i], res["reply"]
            v.judge = {"score": res["score"], "source": res["source"], "text": res["text"],
                       "requests": reply.requests, "prompt_tokens": reply.prompt_tokens,
                       "completion_tokens": reply.completion_tokens, "error": reply.error}
            if reply.stopped:
                v.ok, v.reason, v.stopped = False, "judge_error", reply.stopped
            elif reply.error:
                v.ok, v.reason, v.feedback = False, "judge_error", ""
            elif res["score"] is None:
                v.ok, v.reason = False, "judge_unreadable"
                v.feedback = "The reviewer could not reach a verdict on this plan; state every change plainly."
            elif res["score"] < self.min_score:
                v.ok, v.reason = False, "judge_rejected"
                hint = measurement_hints(tasks[i].measurement)
                v.feedback = (f"A reviewer rated the plan {res['score'] * 5:.1f}/5 for how well it describes the change "
                              f"from the first photo to the second. Describe what really changed more accurately."
                              + (f" {hint}" if hint else ""))
        return verdicts

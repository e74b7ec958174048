"""GRPO-A rewards: the judge's expected score, the weighted sum, the judge's
prompts (files in conf/prompts/) and what the judge reads, the format reward
in its two definitions, and a cheap rule-based alignment score.

The judge (a VLM) is asked for a single digit 0–5; the reward is not the
digit it samples but the expectation under its distribution over the six
digit tokens at the first generated position, divided by 5 so it lies in
[0, 1]. The default prompts (conf/prompts/default.yaml) follow the released
training's order: for Ra the plan under review, then the reference, then
the rubric; for Rc the photo, then the plan, then the rubric.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from aesformer.actions import DIMENSIONS, ActionPlan, extract_dimensions

SCORE_TOKENS: tuple[str, ...] = ("0", "1", "2", "3", "4", "5")
MAX_SCORE = len(SCORE_TOKENS) - 1
# what every 0-5 judge question ends with (VCMP's judge, the distillation validator)
ANSWER_INSTRUCTION = "Reply with a single digit from 0 to 5 and nothing else."
DEFAULT_WEIGHTS: tuple[float, float, float] = (0.1, 0.5, 0.4)  # λf, λa, λc

PlanLike = Union[ActionPlan, str]

# Ra from the judge, or from rule_alignment (no model)
ALIGNMENT_MODES: tuple[str, ...] = ("judge", "rule")


def needs_judge(weights: Sequence[float], alignment: str) -> bool:
    """Whether the weighted reward reads any score from the judge model."""
    return (weights[1] != 0 and alignment == "judge") or weights[2] != 0


# -- scores ----------------------------------------------------------------------

def expected_score(logits: Any) -> Any:
    """E[score]/5 from logits (or log-probabilities) of the tokens "0".."5".

    ``logits`` has shape [..., 6]; the result has shape [...] with values in
    [0, 1]. A torch tensor gives a float32 tensor (differentiable); numpy
    arrays and nested lists give a numpy array, or a float for one vector.
    Uniform logits give 0.5.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(logits, torch.Tensor):
        if logits.shape[-1] != len(SCORE_TOKENS):
            raise ValueError(f"expected_score wants the last dimension to be {len(SCORE_TOKENS)}, got shape {tuple(logits.shape)}")
        probs = torch.softmax(logits.float(), dim=-1)
        values = torch.arange(len(SCORE_TOKENS), dtype=probs.dtype, device=probs.device)
        return (probs * values).sum(-1) / MAX_SCORE
    import numpy as np

    arr = np.asarray(logits, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[-1] != len(SCORE_TOKENS):
        raise ValueError(f"expected_score wants the last dimension to be {len(SCORE_TOKENS)}, got shape {arr.shape}")
    shifted = arr - arr.max(axis=-1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = (probs * np.arange(len(SCORE_TOKENS))).sum(-1) / MAX_SCORE
    return float(out) if out.ndim == 0 else out


def combine(rf: Any, ra: Any, rc: Any, weights: Sequence[float] = DEFAULT_WEIGHTS) -> Any:
    """r = λf·Rf + λa·Ra + λc·Rc; works on floats, numpy arrays and tensors."""
    if len(weights) != 3:
        raise ValueError(f"combine wants three weights (format, alignment, creativity), got {weights!r}")
    wf, wa, wc = weights
    return wf * rf + wa * ra + wc * rc


# -- judge prompts -------------------------------------------------------------------

# A prompt set is a YAML file (conf/prompts/<name>.yaml, or any path) with two
# entries, ``alignment`` and ``creativity``, each a list of message parts in
# order: ``{text: <template>}`` or the word ``image`` (where the photo goes;
# creativity only, exactly once). Templates name the plan under review
# ``{plan}`` and, for alignment, the reference plan ``{reference}``; nothing
# else in them is special, so rubrics may contain braces.
PROMPT_PLACEHOLDERS = {"alignment": ("{plan}", "{reference}"), "creativity": ("{plan}",)}
DEFAULT_PROMPTS = "default"


@dataclass(frozen=True)
class JudgePrompts:
    """The judge's two prompts: each a tuple of parts, a part being a text
    template (str) or None where the photo goes."""

    alignment: tuple
    creativity: tuple
    source: str = "<dict>"

    def to_dict(self) -> dict:
        """The YAML file's form (plain data, safe to send to other processes)."""
        def parts(seq):
            return ["image" if p is None else {"text": p} for p in seq]
        return {"alignment": parts(self.alignment), "creativity": parts(self.creativity)}


def prompts_from_dict(data: Any, source: str = "<dict>") -> JudgePrompts:
    """Validate a prompt set given as plain data (the YAML file's content)."""
    if isinstance(data, JudgePrompts):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"prompt file {source}: expected a mapping with 'alignment' and 'creativity'")
    unknown = sorted(set(data) - set(PROMPT_PLACEHOLDERS))
    missing = sorted(set(PROMPT_PLACEHOLDERS) - set(data))
    if unknown or missing:
        raise ValueError(f"prompt file {source}: needs exactly the keys alignment and creativity"
                         + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                         + (f"; missing: {', '.join(missing)}" if missing else ""))
    out = {}
    for name, placeholders in PROMPT_PLACEHOLDERS.items():
        raw = data[name]
        if isinstance(raw, str):
            raw = [{"text": raw}]
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"prompt file {source}: '{name}' must be a list of parts (text or image)")
        parts: list = []
        for i, part in enumerate(raw):
            if part == "image":
                parts.append(None)
            elif isinstance(part, dict) and set(part) == {"text"} and isinstance(part["text"], str):
                parts.append(part["text"])
            else:
                raise ValueError(f"prompt file {source}: {name} part {i + 1} must be 'image' or {{text: ...}}, "
                                 f"got {part!r}")
        texts = "".join(p for p in parts if p is not None)
        for ph in placeholders:
            if texts.count(ph) != 1:
                raise ValueError(f"prompt file {source}: '{name}' must contain {ph} exactly once, "
                                 f"found it {texts.count(ph)} times")
        images = parts.count(None)
        if name == "alignment" and images:
            raise ValueError(f"prompt file {source}: 'alignment' is text only (the judge sees no photo for Ra)")
        if name == "creativity" and images != 1:
            raise ValueError(f"prompt file {source}: 'creativity' needs the photo exactly once ('image'), "
                             f"found {images}")
        out[name] = tuple(parts)
    return JudgePrompts(out["alignment"], out["creativity"], source)


def prompts_path(spec: str) -> Path:
    """The file of a prompt set: a path to a YAML file, or the name of one in
    conf/prompts/ (with or without ``.yaml``)."""
    from aesformer.config import conf_dir

    direct = Path(spec).expanduser()
    if direct.is_file():
        return direct
    folder = conf_dir() / "prompts"
    for candidate in (folder / spec, folder / f"{spec}.yaml"):
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    raise ValueError(f"no prompt file '{spec}': not a file, and not one of conf/prompts/ ({', '.join(names) or 'empty'})")


def load_prompts(spec: Union[str, Path, dict, JudgePrompts, None] = None) -> JudgePrompts:
    """A prompt set from a name in conf/prompts/ or a file path (None: the
    default set), or from plain data; validated, errors name the file."""
    import yaml

    if spec is None:
        spec = DEFAULT_PROMPTS
    if isinstance(spec, (dict, JudgePrompts)):
        return prompts_from_dict(spec)
    path = prompts_path(str(spec))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"prompt file {path} is not valid YAML: {e}") from e
    return prompts_from_dict(data, str(path))


# -- what the judge reads ----------------------------------------------------------------------

JUDGE_TEXT_MODES = ("plain", "tagged")
FORMAT_MODES = ("strict", "headers")
_PLAN_TAG_RE = re.compile(r"<\s*/?\s*(?:" + "|".join(d.tag for d in DIMENSIONS) + r")\s*>")
_AROUND_MARKS_RE = re.compile(r"\s*([<>/])\s*")


def judge_text(plan: PlanLike, mode: str = "plain") -> str:
    """A plan as the judge reads it.

    ``plain`` (the released training's input): the fourteen tags removed —
    in the release they are special tokens that decoding drops — then the
    whitespace around every remaining ``<``, ``>`` and ``/`` removed, as the
    release does to a response; the headers stay. ``tagged``: the plan as
    written, tags and headers.
    """
    if mode not in JUDGE_TEXT_MODES:
        raise ValueError(f"judge text mode must be one of {', '.join(JUDGE_TEXT_MODES)}, got '{mode}'")
    text = _plan_text(plan)
    if mode == "tagged":
        return text
    return _AROUND_MARKS_RE.sub(r"\1", _PLAN_TAG_RE.sub("", text)).strip()


_RELEASED_HEADER_RES = tuple(re.compile(re.escape(f"({d.index})") + r"\s*" + re.escape(d.header) + r"\s*:")
                             for d in DIMENSIONS)


def headers_format_reward(text: str) -> float:
    """Rf as the released training computes it: 1.0 iff the seven headers
    ``(k) Header:`` appear in order 1→7 (after whitespace around ``<``, ``>``,
    ``/`` is removed); tags and any other text are allowed."""
    text = _AROUND_MARKS_RE.sub(r"\1", text or "")
    pos = 0
    for pattern in _RELEASED_HEADER_RES:
        m = pattern.search(text, pos)
        if m is None:
            return 0.0
        pos = m.end()
    return 1.0


def format_score(text: str, mode: str = "strict") -> float:
    """Rf. ``strict`` (the paper's definition, :func:`aesformer.actions.format_reward`):
    each dimension inside its own tags, in order, nothing else. ``headers``:
    the released training's check, :func:`headers_format_reward`."""
    from aesformer.actions import format_reward

    if mode == "strict":
        return format_reward(text)
    if mode == "headers":
        return headers_format_reward(text)
    raise ValueError(f"format mode must be one of {', '.join(FORMAT_MODES)}, got '{mode}'")


def shrink_image(image: Any, max_side: Optional[int]) -> Any:
    """The photo scaled down (aspect kept) so its longer side is at most
    ``max_side`` pixels, as the released reward server does for Rc (sides
    truncated to whole pixels); unchanged when it fits or ``max_side`` is
    None or 0."""
    if not max_side:
        return image
    w, h = image.size
    side = max(w, h)
    if side <= max_side:
        return image
    scale = max_side / side
    return image.resize((max(1, int(w * scale)), max(1, int(h * scale))))


def _fill(parts: Sequence, values: dict[str, str], image: Any = None) -> list[dict]:
    out: list[dict] = []
    for part in parts:
        if part is None:
            out.append({"type": "image", **({"image": image} if image is not None else {})})
            continue
        text = part
        for key, value in values.items():
            text = text.replace(key, value)
        out.append({"type": "text", "text": text})
    return out


def alignment_request(prompts: JudgePrompts, plan: PlanLike, reference: PlanLike, mode: str = "plain") -> dict:
    """The judge request for Ra (text only): the alignment prompt with the
    plan under review and the reference, both as :func:`judge_text` gives them."""
    parts = _fill(prompts.alignment, {"{plan}": judge_text(plan, mode), "{reference}": judge_text(reference, mode)})
    return {"messages": [{"role": "user", "content": parts}]}


def creativity_request(prompts: JudgePrompts, plan: PlanLike, image: Any, mode: str = "plain",
                       image_max_side: Optional[int] = 512) -> dict:
    """The judge request for Rc: the creativity prompt with the plan (as
    :func:`judge_text` gives it) and the photo, shrunk to ``image_max_side``."""
    photo = shrink_image(image, image_max_side) if image is not None else None
    parts = _fill(prompts.creativity, {"{plan}": judge_text(plan, mode)}, photo)
    return {"messages": [{"role": "user", "content": parts}]}


def _plan_text(plan: PlanLike) -> str:
    if isinstance(plan, ActionPlan):
        return plan.render()
    return str(plan).strip()


# -- rule-based alignment ------------------------------------------------------------

_WORD_RE = re.compile(r"[a-z0-9]+(?::[0-9]+)?")


def _tokens(text: Optional[str]) -> Counter:
    return Counter(_WORD_RE.findall((text or "").lower()))


def _dimension_texts(plan: PlanLike) -> dict[str, Optional[str]]:
    # a plan that parses gives the same texts through extract_dimensions, so no parse first
    return plan.to_dict() if isinstance(plan, ActionPlan) else extract_dimensions(str(plan))


def _f1(a: Counter, b: Counter) -> float:
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    overlap = sum((a & b).values())
    return 2.0 * overlap / (sum(a.values()) + sum(b.values()))


def rule_alignment(plan: PlanLike, reference: PlanLike) -> float:
    """Token-overlap F1 per dimension (lower-cased words, headers excluded),
    averaged over the seven dimensions; in [0, 1].

    A cheap stand-in for the alignment judge, for debugging and CPU tests.
    Text that does not parse is read dimension by dimension as far as
    possible; a dimension that cannot be found in the candidate scores 0.
    """
    cand, ref = _dimension_texts(plan), _dimension_texts(reference)
    total = 0.0
    for d in DIMENSIONS:
        if cand.get(d.key) is None:
            continue  # missing in the candidate: 0 for this dimension
        total += _f1(_tokens(cand[d.key]), _tokens(ref.get(d.key)))
    return total / len(DIMENSIONS)

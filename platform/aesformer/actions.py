"""The seven-dimension action plan: what AesThinker writes and what the rest
of the platform reads.

A plan is seven lines, one per photographic dimension, ordered from global
(aspect ratio) to local (colour and lighting)::

    <Ratio>(1) Aspect Ratio: crop to 4:5 portrait</Ratio>
    <Composition>(2) Framing and Composition: ...</Composition>
    ...
    <Color>(7) Color and Lighting Adjustment: ...</Color>

The fourteen tag strings are added to the thinker's tokenizer as whole
tokens (:func:`add_plan_tokens`), so a tag costs one token and the model
cannot misspell it. Parsing tolerates whitespace around ``<``, ``>`` and
``/``, inside the header's punctuation, and between lines; it is strict about
everything else, because the format reward Rf is computed from it.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional


@dataclass(frozen=True)
class Dimension:
    """One photographic dimension of a plan."""

    index: int  # 1-based position in the plan
    key: str  # field name on ActionPlan
    tag: str  # delimiter name: <tag>…</tag>
    header: str  # human title, rendered as "(index) header:"

    @property
    def open_tag(self) -> str:
        return f"<{self.tag}>"

    @property
    def close_tag(self) -> str:
        return f"</{self.tag}>"

    @property
    def label(self) -> str:
        """The header as it appears inside the tags, e.g. ``(1) Aspect Ratio:``."""
        return f"({self.index}) {self.header}:"

    def __str__(self) -> str:  # used in error messages
        return f"{self.key} ({self.index}, <{self.tag}>)"


DIMENSIONS: tuple[Dimension, ...] = (
    Dimension(1, "ratio", "Ratio", "Aspect Ratio"),
    Dimension(2, "composition", "Composition", "Framing and Composition"),
    Dimension(3, "camera", "Camera", "Camera Position and Viewpoint"),
    Dimension(4, "position", "Position", "Subject Position"),
    Dimension(5, "pose", "Pose", "Subject Pose and Action Details"),
    Dimension(6, "focus", "Focus", "Depth of Field and Focus Control"),
    Dimension(7, "color", "Color", "Color and Lighting Adjustment"),
)
KEYS: tuple[str, ...] = tuple(d.key for d in DIMENSIONS)
BY_KEY: dict[str, Dimension] = {d.key: d for d in DIMENSIONS}
BY_TAG: dict[str, Dimension] = {d.tag: d for d in DIMENSIONS}

# Open then close, dimension by dimension: <Ratio>, </Ratio>, <Composition>, …
SPECIAL_TOKENS: tuple[str, ...] = tuple(t for d in DIMENSIONS for t in (d.open_tag, d.close_tag))


class PlanFormatError(ValueError):
    """A plan that does not follow the seven-dimension format.

    ``dimension`` is the key of the offending dimension (None when the problem
    is not tied to one) and ``problem`` one of: missing, unclosed,
    out_of_order, duplicate, no_header, stray_text, nested, empty.
    """

    def __init__(self, message: str, dimension: Optional[str] = None, problem: str = "format"):
        super().__init__(message)
        self.dimension = dimension
        self.problem = problem


# Any of the 14 tags, with loose whitespace: "< / Ratio >" is a closing Ratio tag.
_TAG_RE = re.compile(r"<\s*(/)?\s*(" + "|".join(d.tag for d in DIMENSIONS) + r")\s*>")


def _header_re(d: Dimension) -> re.Pattern:
    # "(1) Aspect Ratio:" with any whitespace around the punctuation and
    # between words, any letter case.
    words = r"\s+".join(re.escape(w) for w in d.header.split())
    return re.compile(r"\s*\(\s*" + str(d.index) + r"\s*\)\s*" + words + r"\s*:", re.IGNORECASE)


_HEADER_RES = {d.key: _header_re(d) for d in DIMENSIONS}


def _find_tags(text: str) -> list[tuple[int, int, bool, Dimension]]:
    """(start, end, is_close, dimension) for every tag in the text, in order."""
    return [(m.start(), m.end(), bool(m.group(1)), BY_TAG[m.group(2)]) for m in _TAG_RE.finditer(text)]


def _strip_header(d: Dimension, body: str) -> Optional[str]:
    m = _HEADER_RES[d.key].match(body)
    return None if m is None else body[m.end():].strip()


@dataclass(frozen=True)
class ActionPlan:
    """One text per dimension (without tags or headers)."""

    ratio: str = ""
    composition: str = ""
    camera: str = ""
    position: str = ""
    pose: str = ""
    focus: str = ""
    color: str = ""

    # -- access ------------------------------------------------------------
    def __getitem__(self, key: str) -> str:
        if key not in BY_KEY:
            raise KeyError(f"unknown dimension '{key}'; dimensions are {', '.join(KEYS)}")
        return getattr(self, key)

    def items(self) -> Iterator[tuple[Dimension, str]]:
        for d in DIMENSIONS:
            yield d, getattr(self, d.key)

    def to_dict(self) -> dict[str, str]:
        return {d.key: getattr(self, d.key) for d in DIMENSIONS}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ActionPlan":
        """From ``{key: text}``; every dimension must be present (text may be empty)."""
        unknown = set(values) - set(KEYS)
        if unknown:
            raise PlanFormatError(f"unknown plan dimension(s): {', '.join(sorted(unknown))}", problem="unknown")
        for d in DIMENSIONS:
            if d.key not in values or values[d.key] is None:
                raise PlanFormatError(f"plan dimension {d} is missing", d.key, "missing")
        return cls(**{k: str(values[k]).strip() for k in KEYS})

    # -- text form -----------------------------------------------------------
    def lines(self) -> list[str]:
        out = []
        for d, text in self.items():
            text = " ".join(str(text).split())  # one line per dimension
            if _TAG_RE.search(text):
                raise PlanFormatError(f"plan dimension {d} contains a plan tag in its text: {text!r}", d.key, "nested")
            out.append(f"{d.open_tag}{d.label} {text}{d.close_tag}" if text else f"{d.open_tag}{d.label}{d.close_tag}")
        return out

    def render(self) -> str:
        """The canonical seven lines ``<Tag>(k) Header: text</Tag>``."""
        return "\n".join(self.lines())

    def __str__(self) -> str:
        return self.render()

    @classmethod
    def parse(cls, text: str, *, strict: bool = True) -> "ActionPlan":
        """Read a rendered plan back.

        Tolerates whitespace around ``<``, ``>``, ``/``, in the headers and
        between lines. With ``strict`` (the default, and what the format
        reward uses) only whitespace may appear outside the tags; with
        ``strict=False`` text around the seven blocks (a model's preamble,
        say) is ignored. Raises :class:`PlanFormatError` naming the
        dimension that is missing, unclosed, out of order, duplicated or
        without its header.
        """
        if not isinstance(text, str):
            raise PlanFormatError(f"a plan must be text, got {type(text).__name__}", problem="type")
        tags = _find_tags(text)
        present = {d.key for _, _, close, d in tags if not close}
        values: dict[str, str] = {}
        i = 0  # index into tags
        pos = 0  # end of the previous block
        for d in DIMENSIONS:
            if i >= len(tags):
                # ran out of tags: this dimension never opens
                raise PlanFormatError(f"plan dimension {d} is missing", d.key, "missing")
            start, end, close, got = tags[i]
            if close or got is not d:
                if got.index < d.index and not close:
                    raise PlanFormatError(f"plan dimension {got} appears again where {d} should open", got.key, "duplicate")
                if close and got is d:
                    raise PlanFormatError(f"plan dimension {d} has a closing tag but no opening tag", d.key, "missing")
                if close:
                    raise PlanFormatError(f"unexpected closing tag {got.close_tag} where {d.open_tag} should open", got.key,
                                          "out_of_order")
                if d.key in present:
                    raise PlanFormatError(f"plan dimension {d} is out of order: {got.open_tag} comes before it", d.key,
                                          "out_of_order")
                raise PlanFormatError(f"plan dimension {d} is missing", d.key, "missing")
            if strict and text[pos:start].strip():
                where = "before the plan" if d.index == 1 else f"between {DIMENSIONS[d.index - 2].close_tag} and {d.open_tag}"
                raise PlanFormatError(f"unexpected text {where}: {text[pos:start].strip()[:60]!r}", d.key, "stray_text")
            if i + 1 >= len(tags):
                raise PlanFormatError(f"plan dimension {d} is not closed: {d.close_tag} is missing", d.key, "unclosed")
            cstart, cend, cclose, cgot = tags[i + 1]
            if not (cclose and cgot is d):
                raise PlanFormatError(f"plan dimension {d} is not closed before {'</' if cclose else '<'}{cgot.tag}>",
                                      d.key, "unclosed")
            body = _strip_header(d, text[end:cstart])
            if body is None:
                raise PlanFormatError(f"plan dimension {d} lacks its header '{d.label}'", d.key, "no_header")
            values[d.key] = " ".join(body.split())
            i += 2
            pos = cend
        if i < len(tags):
            _, _, close, got = tags[i]
            raise PlanFormatError(f"plan dimension {got} appears more than once", got.key, "duplicate")
        if strict and text[pos:].strip():
            raise PlanFormatError(f"unexpected text after the plan: {text[pos:].strip()[:60]!r}", DIMENSIONS[-1].key,
                                  "stray_text")
        return cls(**values)

    def replace(self, **changes: str) -> "ActionPlan":
        return dataclasses.replace(self, **changes)


def format_reward(text: str) -> float:
    """Rf: 1.0 iff all seven dimensions are present, each inside its own tags
    with its header, in order 1→7, and nothing but whitespace outside them."""
    try:
        ActionPlan.parse(text, strict=True)
    except PlanFormatError:
        return 0.0
    return 1.0


def extract_dimensions(text: str) -> dict[str, Optional[str]]:
    """Best-effort reading of a plan that may be malformed: for each key, the
    text of the first ``<Tag>…</Tag>`` block of that dimension (header
    removed when present), or None when the block cannot be found."""
    out: dict[str, Optional[str]] = {}
    tags = _find_tags(text or "")
    for d in DIMENSIONS:
        out[d.key] = None
        for j, (_, end, close, got) in enumerate(tags):
            if close or got is not d:
                continue
            nxt = next((t for t in tags[j + 1:] if t[2] and t[3] is d), None)
            if nxt is None:
                break
            body = text[end:nxt[0]]
            stripped = _strip_header(d, body)
            out[d.key] = " ".join((stripped if stripped is not None else body).split())
            break
    return out


def add_plan_tokens(tokenizer: Any) -> int:
    """Add the 14 tag strings to a Hugging Face tokenizer as whole tokens;
    returns how many were new (resize the model's embeddings by that).

    They are added as *non-special* added tokens so that decoding with
    ``skip_special_tokens=True`` keeps them in the text.
    """
    return tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=False)


# -- the thinker's instruction -------------------------------------------------

def format_template() -> str:
    """The seven lines with a placeholder for the text, for prompts."""
    return "\n".join(f"{d.open_tag}{d.label} ...{d.close_tag}" for d in DIMENSIONS)


# The default instruction with a {format} placeholder for the seven-line template.
THINKER_INSTRUCTION_TEMPLATE = (
    "You are an expert photographer. Study this photo and write a plan that would make it more "
    "aesthetically pleasing by changing how it was captured: the aspect ratio, the framing and composition, "
    "the camera position and viewpoint, where the subject sits in the frame, the subject's pose, the depth "
    "of field and focus, and the colour and lighting. Favour structural photographic changes over filters. "
    "Keep the subject's identity and the scene as they are. Work only with what is visible in the photo: "
    "never add or assume people, objects or details that are not there.\n"
    "Write exactly seven lines in this order, each wrapped in its own tags, and nothing else:\n"
    "{format}"
)
# The default instruction, template filled in.
THINKER_INSTRUCTION = THINKER_INSTRUCTION_TEMPLATE.replace("{format}", format_template())


def thinker_instruction(override: Optional[str] = None) -> str:
    """The instruction given to the thinker with each photo.

    ``override`` replaces the default text; a ``{format}`` placeholder in it,
    if present, is filled with the seven-line template.
    """
    if override is None:
        return THINKER_INSTRUCTION
    return override.replace("{format}", format_template())


def thinker_messages(instruction: Optional[str] = None) -> list[dict]:
    """A one-turn chat for the thinker: the photo, then the instruction.

    The ``{"type": "image"}`` part marks where the photo goes; a caller adds
    ``"image": <PIL image>`` to it or passes the image to the processor.
    """
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": thinker_instruction(instruction)}]}]

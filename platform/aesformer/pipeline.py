"""AesFormer: the thinker writes a plan, the editor carries it out.

:class:`AesFormer` holds both models: the thinker behind the engine
interface (:func:`aesformer.engines.make_engine`: transformers on CPU, vLLM on
GPU) and the editor (:class:`aesformer.editor.Editor`, with the AesEditor
LoRA). ``reconstruct(photo)`` returns ``(plan, image)``.

A plan that does not parse as the seven-dimension format is still used, as
free text, with a warning: the editor was trained on plans, but any
instruction is better than dropping the photo.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from PIL import Image

from aesformer.actions import ActionPlan, PlanFormatError, thinker_instruction
from aesformer.editor import CONTROL_AREA, CONDITION_AREA, Editor, calculate_dimensions

log = logging.getLogger(__name__)

# The released output: about 1440×1088 (4:3), i.e. this many pixels at the photo's aspect.
OUTPUT_AREA = 1440 * 1088


def edit_prompt(plan: str) -> str:
    """The editor's instruction for a plan (training and inference share it)."""
    return (plan or "").strip() or " "


def normalise_plan(text: str) -> tuple[str, bool]:
    """(plan text, parsed): the canonical rendering of a plan that parses,
    else the text itself (used as free text, with a warning)."""
    try:
        return ActionPlan.parse(text).render(), True
    except PlanFormatError as e:
        log.warning("plan does not parse (%s); using it as free text", e)
        return (text or "").strip(), False


# The released evaluation renders every reconstruction 1088 wide and 1440 high
# with seed 1234, whatever the photo's aspect.
RELEASED_RENDER = {"width": 1088, "height": 1440, "seed": 1234}
RENDER_MODES = ("aspect", "released")


def render_settings(mode: str = "aspect", *, seed: int = 0, height: Optional[int] = None,
                    width: Optional[int] = None) -> dict:
    """The editor's output size and seed: ``{"height", "width", "seed"}``.

    ``aspect``: ``height``/``width`` as given (None: about the output area at
    the photo's aspect, see :func:`output_size`) and ``seed``. ``released``:
    the released evaluation's fixed 1088×1440 and seed 1234.
    """
    if mode == "aspect":
        return {"height": height, "width": width, "seed": int(seed)}
    if mode == "released":
        return dict(RELEASED_RENDER)
    raise ValueError(f"render must be one of {', '.join(RENDER_MODES)}, got '{mode}'")


def output_size(photo: Image.Image, area: int = OUTPUT_AREA, height: Optional[int] = None,
                width: Optional[int] = None) -> tuple[int, int]:
    """(w, h) of the reconstruction: as requested, else ``area`` pixels at the photo's aspect."""
    if height and width:
        return int(width), int(height)
    w, h = calculate_dimensions(area, photo.width / photo.height)
    return int(width or w), int(height or h)


class AesFormer:
    """Thinker ▶ editor on one photo at a time."""

    def __init__(self, thinker: Any, editor: Editor, *, instruction: Optional[str] = None,
                 sampling: Optional[dict] = None, steps: int = 40, true_cfg_scale: float = 4.0,
                 negative_prompt: Optional[str] = " ", output_area: int = OUTPUT_AREA):
        from aesformer.engines import SamplingSettings

        self.thinker, self.editor = thinker, editor
        self.instruction = thinker_instruction(instruction)
        # the released validation sampling of the thinker
        self.sampling = SamplingSettings.of(sampling or dict(temperature=0.6, top_p=0.95, max_tokens=1024))
        self.steps, self.true_cfg_scale, self.negative_prompt = steps, true_cfg_scale, negative_prompt
        self.output_area = output_area

    @classmethod
    def load(cls, thinker: str, editor: str, *, lora: Optional[str] = None, engine: str = "hf",
             engine_options: Optional[dict] = None, control_area: int = CONTROL_AREA,
             condition_area: int = CONDITION_AREA, dtype: str = "float32", device: str = "auto",
             editor_name: Optional[str] = None, **settings: Any) -> "AesFormer":
        """Both models from local paths (or hub ids); ``settings`` go to the constructor."""
        from aesformer.engines import make_engine, resolve_engine_kind

        engine_kind = resolve_engine_kind(engine)
        think = make_engine(engine_kind, thinker, **(engine_options or {}))
        ed = Editor.load(editor, lora=lora, control_area=control_area, condition_area=condition_area,
                         dtype=dtype, device=device, name=editor_name)
        return cls(think, ed, **settings)

    def think(self, photos: list[Image.Image], seed: int = 0) -> list[str]:
        """One plan text per photo (raw thinker output)."""
        from dataclasses import replace

        requests = [{"images": [p.convert("RGB")], "text": self.instruction} for p in photos]
        outs = self.thinker.generate(requests, replace(self.sampling, n=1, seed=seed))
        return [o[0].text for o in outs]

    def edit(self, photo: Image.Image, plan: str, seed: int = 0, height: Optional[int] = None,
             width: Optional[int] = None, steps: Optional[int] = None) -> Image.Image:
        w, h = output_size(photo, self.output_area, height, width)
        out = self.editor.edit(photo, edit_prompt(plan), seed=seed, steps=steps or self.steps,
                               true_cfg_scale=self.true_cfg_scale, negative_prompt=self.negative_prompt,
                               height=h, width=w)
        # the editor works on a 16-pixel grid: give back exactly the size asked for
        return out if out.size == (w, h) else out.resize((w, h), Image.Resampling.LANCZOS)

    def reconstruct(self, photo: Image.Image, plan: Optional[str] = None, seed: int = 0,
                    height: Optional[int] = None, width: Optional[int] = None) -> tuple[str, Image.Image]:
        """(plan, reconstructed image). ``plan`` given: the thinker is skipped."""
        text = plan if plan is not None else self.think([photo], seed=seed)[0]
        text, _ = normalise_plan(text)
        return text, self.edit(photo, text, seed=seed, height=height, width=width)

"""Stage 1(a) SFT of the thinker: the parts that need no Ray.

- samples: (photo bytes, plan text) → model inputs with labels on the plan
  only, built with the model's own chat template and processor
  (:func:`build_sample`); bad images and plans raise :class:`SampleError`
  with a reason, so the loop can skip and count them (:class:`SampleCounts`);
  prompt + plan are cut at ``cutoff`` tokens and the cut is counted;
- batches: :func:`collate` pads a list of samples (right padding);
- the learning-rate schedule: linear warmup then cosine decay
  (:func:`lr_factor`, :func:`make_scheduler`);
- the data position: how many optimizer steps the run holds and where a
  step sits in the data stream (:class:`StepLayout`), so a resumed run
  neither repeats nor skips samples;
- the model: LoRA on every linear layer of the language model, the vision
  tower frozen, embeddings and lm_head trained in full (:func:`apply_lora`);
- export: the adapter and the merged model in the Hugging Face layout
  (:func:`save_adapter`, :func:`export_model`).
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

IGNORE_INDEX = -100
# Per-token sequences in a sample; everything else is per image.
SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "labels")
IMAGE_KEYS = ("pixel_values", "image_grid_thw")
# Why a sample was skipped.
SKIP_REASONS = ("image", "plan", "too_long")
ADAPTER_DIR = "adapter"


class SampleError(ValueError):
    """A pair that cannot become a training sample; ``reason`` is one of
    :data:`SKIP_REASONS` (the image does not decode, the plan does not
    parse, the prompt alone fills the cutoff)."""

    def __init__(self, message: str, reason: str, row: Any = None):
        super().__init__(f"row '{row}': {message}" if row is not None else message)
        self.reason = reason
        self.row = row


# -- samples -------------------------------------------------------------------------------

def cap_pixels(image: Any, max_pixels: Optional[int]) -> Any:
    """The image scaled down (aspect kept) so that width × height ≤ ``max_pixels``;
    unchanged when it already fits or ``max_pixels`` is None."""
    if not max_pixels:
        return image
    w, h = image.size
    if w * h <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (w * h))
    nw, nh = max(1, int(w * scale)), max(1, int(h * scale))
    while nw * nh > max_pixels:  # rounding can overshoot by a pixel row
        nw, nh = (nw - 1, nh) if nw >= nh else (nw, nh - 1)
    from PIL import Image

    return image.resize((nw, nh), Image.Resampling.BICUBIC)


def fit_pixels(image: Any, min_pixels: Optional[int], max_pixels: Optional[int]) -> Any:
    """The image scaled (aspect kept) into [``min_pixels``, ``max_pixels``]
    pixels: down as :func:`cap_pixels`, or up (bicubic) when smaller than
    ``min_pixels``; either bound may be None or 0 (no bound)."""
    image = cap_pixels(image, max_pixels)
    w, h = image.size
    if not min_pixels or w * h >= min_pixels:
        return image
    scale = math.sqrt(min_pixels / (w * h))
    nw, nh = max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))
    from PIL import Image

    return image.resize((nw, nh), Image.Resampling.BICUBIC)


def build_sample(processor: Any, image: Any, plan: str, *, instruction: str, cutoff: int,
                 max_pixels: Optional[int] = None, row: Any = None) -> dict:
    """One training sample: ``photo + instruction → plan``.

    ``image`` is encoded bytes or a PIL image; ``plan`` the seven-line plan
    text (trained on in its canonical rendering). Returns the model inputs
    for a batch of one squeezed to 1-D sequences (``input_ids``,
    ``attention_mask``, ``labels`` -100 outside the plan, …) plus
    ``pixel_values``/``image_grid_thw``, and two bookkeeping entries:
    ``cut`` (the sequence was cut at ``cutoff``) and ``plan_tokens``.
    Raises :class:`SampleError` for an image that does not decode, a plan
    that does not parse, or a prompt that leaves no room for the plan.
    """
    from aesformer.actions import ActionPlan, PlanFormatError
    from aesformer.data import PairError, decode_image
    from aesformer.models import chat_inputs

    if isinstance(image, (bytes, bytearray, memoryview)) or image is None:
        try:
            image = decode_image(image, row=row, field="poor_image")
        except PairError as exc:
            raise SampleError(exc.reason, "image", row) from exc
    else:
        image = image.convert("RGB")
    try:
        text = ActionPlan.parse(plan if plan is not None else "").render()
    except PlanFormatError as exc:
        raise SampleError(f"plan does not parse: {exc}", "plan", row) from exc
    image = cap_pixels(image, max_pixels)
    inputs = chat_inputs(processor, image, instruction, response=text)
    sample: dict = {}
    for key, value in inputs.items():
        sample[key] = value[0] if key in SEQUENCE_KEYS else value
    length = sample["input_ids"].shape[0]
    cut = length > cutoff
    if cut:
        for key in SEQUENCE_KEYS:
            if key in sample:
                sample[key] = sample[key][:cutoff]
    plan_tokens = int((sample["labels"] != IGNORE_INDEX).sum())
    if plan_tokens == 0:
        raise SampleError(f"the prompt alone is {length - int((inputs['labels'] != IGNORE_INDEX).sum())} tokens, "
                          f"no room for the plan within cutoff={cutoff}", "too_long", row)
    sample["cut"] = cut
    sample["plan_tokens"] = plan_tokens
    return sample


@dataclass
class SampleCounts:
    """What became of the samples read: used (of which ``cut`` were cut at
    the cutoff) or skipped, by reason."""

    used: int = 0
    cut: int = 0
    skipped: dict = field(default_factory=lambda: {r: 0 for r in SKIP_REASONS})

    def add_used(self, cut: bool) -> None:
        self.used += 1
        self.cut += int(bool(cut))

    def add_skipped(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def as_vector(self) -> list[float]:
        """[used, cut, skipped per reason…] for an all-reduce across workers."""
        return [float(self.used), float(self.cut)] + [float(self.skipped.get(r, 0)) for r in SKIP_REASONS]

    @classmethod
    def from_vector(cls, values: Sequence[float]) -> "SampleCounts":
        values = [int(round(float(v))) for v in values]
        return cls(values[0], values[1], dict(zip(SKIP_REASONS, values[2:])))

    def to_dict(self) -> dict:
        return {"used": self.used, "cut": self.cut, "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, d: Optional[Mapping]) -> "SampleCounts":
        if not d:
            return cls()
        skipped = {r: 0 for r in SKIP_REASONS}
        skipped.update({k: int(v) for k, v in (d.get("skipped") or {}).items()})
        return cls(int(d.get("used", 0)), int(d.get("cut", 0)), skipped)

    def merged(self, other: "SampleCounts") -> "SampleCounts":
        return SampleCounts.from_vector([a + b for a, b in zip(self.as_vector(), other.as_vector())])


def collate(samples: Sequence[Mapping], pad_id: int) -> dict:
    """Right-pad the samples' sequences into a batch (``labels`` with -100,
    ``attention_mask`` and token types with 0, ``input_ids`` with
    ``pad_id``) and concatenate their images."""
    import torch

    if not samples:
        raise ValueError("collate needs at least one sample")
    width = max(s["input_ids"].shape[0] for s in samples)
    pads = {"input_ids": pad_id, "labels": IGNORE_INDEX}
    batch: dict = {}
    for key in SEQUENCE_KEYS:
        if key not in samples[0]:
            continue
        rows = []
        for s in samples:
            seq = s[key]
            fill = seq.new_full((width - seq.shape[0],), pads.get(key, 0))
            rows.append(torch.cat([seq, fill]))
        batch[key] = torch.stack(rows)
    for key in IMAGE_KEYS:
        if key in samples[0]:
            batch[key] = torch.cat([s[key] for s in samples], dim=0)
    known = set(SEQUENCE_KEYS) | set(IMAGE_KEYS) | {"cut", "plan_tokens"}
    unknown = set(samples[0]) - known
    if unknown:
        raise ValueError(f"collate does not know how to batch: {', '.join(sorted(unknown))}")
    return batch


# -- learning-rate schedule ------------------------------------------------------------------

SCHEDULES = ("cosine", "linear", "constant")


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length as the Hugging Face trainer counts it: ceil(total × ratio)."""
    return int(math.ceil(total_steps * warmup_ratio))


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str = "cosine") -> float:
    """The multiplier of the peak learning rate after ``step`` optimizer steps:
    linear from 0 to 1 over ``warmup`` steps, then cosine (or linear) down to
    0 at ``total_steps`` (or constant)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule '{schedule}'; one of {', '.join(SCHEDULES)}")
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: Any, total_steps: int, warmup: int, schedule: str = "cosine") -> Any:
    """A torch LambdaLR following :func:`lr_factor`; its state (the step
    count) is saved and restored with the checkpoint."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, schedule))


# -- data position ---------------------------------------------------------------------------

@dataclass(frozen=True)
class StepLayout:
    """How the training stream is laid out.

    The stream is every epoch's copy of the data one after the other (each
    in its own seeded order), split evenly over the workers: a worker takes
    ``micro_batches`` micro-batches of ``micro_batch`` rows,
    ``grad_accum`` per optimizer step. The stream is deterministic, so the
    data position of a step is simply ``step × grad_accum`` micro-batches
    into each worker's shard.
    """

    rows: int  # rows with a layout (one epoch)
    world_size: int
    micro_batch: int
    grad_accum: int
    epochs: int

    @property
    def rows_per_worker(self) -> int:
        # Ray Data's equal split drops the remainder
        return self.rows * self.epochs // self.world_size

    @property
    def total_steps(self) -> int:
        return self.rows_per_worker // (self.micro_batch * self.grad_accum)

    @property
    def micro_batches(self) -> int:
        return self.total_steps * self.grad_accum

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def samples_seen(self, step: int) -> int:
        return step * self.global_batch

    def epoch_at(self, step: int) -> float:
        """Epochs done after ``step`` optimizer steps (fractional)."""
        return self.samples_seen(step) / max(1, self.rows)


def step_layout(rows: int, world_size: int, micro_batch: int, grad_accum: int, epochs: int) -> StepLayout:
    """The layout for ``rows`` rows per epoch over ``world_size`` workers;
    ValueError when the data cannot fill one optimizer step."""
    layout = StepLayout(rows, world_size, micro_batch, grad_accum, epochs)
    if layout.total_steps < 1:
        raise ValueError(f"{rows} training rows × {epochs} epochs cannot fill one optimizer step: {world_size} "
                         f"workers × micro_batch {micro_batch} × grad_accum {grad_accum} need {layout.global_batch}")
    return layout


def resumed_step(samples_seen: int, layout: StepLayout) -> int:
    """The step to continue from after ``samples_seen`` rows under ``layout``
    (exact when the world size is unchanged; the nearest step below when an
    elastic restart changed it)."""
    return min(layout.total_steps, samples_seen // layout.global_batch)


# -- the model -----------------------------------------------------------------------------

def language_model_linears(model: Any) -> list[str]:
    """Names of every ``nn.Linear`` inside the language model (not the
    vision tower, not lm_head): LoRA's targets."""
    import torch

    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        parts = name.split(".")
        in_vision = any(p in ("visual", "vision_tower", "vision_model") for p in parts)
        # Qwen-VL nests the text model as ``language_model``; a plain causal
        # LM has its blocks under ``layers``.
        if "language_model" in parts or (not in_vision and "layers" in parts):
            names.append(name)
    if not names:
        raise ValueError(f"found no linear layers of a language model in {type(model).__name__}")
    return names


def apply_lora(model: Any, rank: int = 8, alpha: int = 16, dropout: float = 0.05,
               full_modules: Sequence[str] = ("embed_tokens", "lm_head")) -> Any:
    """The peft model: LoRA of ``rank`` on every linear layer of the language
    model, ``full_modules`` (the token embeddings and lm_head, so the new tag
    tokens are learned) trained in full, everything else — the vision tower
    included — frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=language_model_linears(model),
                        modules_to_save=list(full_modules) or None, bias="none")
    return get_peft_model(model, config)


# -- export ---------------------------------------------------------------------------------

def save_adapter(model: Any, processor: Any, directory: str | os.PathLike) -> Path:
    """The peft adapter (LoRA weights plus the fully trained embeddings and
    lm_head) and the extended processor, in the Hugging Face layout. Under
    ZeRO-3 call it inside :func:`aesformer.deepspeed_engine.gathered` over the trainable
    parameters."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # embed_tokens/lm_head are saved in full as modules_to_save already
    model.save_pretrained(str(out), save_embedding_layers=False)
    processor.save_pretrained(str(out))
    return out


def load_adapter_weights(model: Any, adapter_dir: str | os.PathLike) -> None:
    """Load a saved adapter's weights into a peft model of the same shape."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no adapter weights at {path}")
    result = set_peft_model_state_dict(model, load_file(str(path)))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"adapter at {adapter_dir} does not fit the model: unexpected {unexpected[:3]}")


def export_model(base_model: str, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 dtype: str = "float32") -> dict:
    """Write ``out_dir/adapter`` and ``out_dir/merged``.

    The base model gets the tag tokens and resized embeddings exactly as in
    training, the adapter is loaded onto it and merged; the merged model and
    the extended processor are saved so that ``from_pretrained`` (and vLLM's
    loader) read them like any Qwen-VL checkpoint. A local folder is
    written under a temporary name and swapped in, so a crash never leaves
    half of one; ``out_dir`` may also be a URI.
    """
    import torch
    from peft import PeftModel

    from aesformer import storage
    from aesformer.models import add_plan_tokens, load_vlm

    adapter_dir = storage.local_copy(adapter_dir)  # at a URI: this node's copy
    torch_dtype = getattr(torch, dtype)
    model, processor = load_vlm(base_model, dtype=torch_dtype)
    add_plan_tokens(model, processor)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    merged = peft_model.merge_and_unload()
    merged.config.use_cache = True

    def write_merged(tmp: Path) -> None:
        merged.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))

    def write_adapter(tmp: Path) -> None:
        shutil.copytree(adapter_dir, tmp, dirs_exist_ok=True)
        processor.save_pretrained(str(tmp))

    storage.makedirs(out_dir)
    paths = {"merged": storage.join(out_dir, "merged"), "adapter": storage.join(out_dir, "adapter")}
    storage.write_dir(paths["merged"], write_merged)  # a local folder or a URI
    storage.write_dir(paths["adapter"], write_adapter)
    return paths

"""The one image-editor wrapper of the platform (AesEditor, overlay removal).

:class:`Editor` holds a diffusers ``QwenImageEditPlusPipeline`` (the class
Qwen-Image-Edit-2511 runs with) and adds what the platform needs on top of it:

- the control-image area (the VAE copy of the input, 1024×1024 in the
  released model) and the area of the vision-language copy (384×384) are
  parameters, so the tiny profile can run with small images;
- the number of template tokens dropped from the text condition is computed
  from the template with the pipeline's own tokenizer (diffusers hard-codes
  64, which is right for Qwen's tokenizer only);
- the pieces the training cache needs (VAE latents, the text condition of a
  plan with its control image) come from the pipeline's own methods, so the
  cached tensors are exactly what inference feeds the transformer;
- a LoRA records the base it was trained on; loading one onto another base
  fails, naming both.

``transformer_forward`` is the one place that lays out the transformer's
input (``[noisy target | clean control]`` tokens, per-image shapes for the
rotary embedding, prediction sliced back to the target), shared by training
and, through diffusers, identical to inference.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import threading
from pathlib import Path
from typing import Any, Optional, Union

import torch
from PIL import Image

log = logging.getLogger(__name__)

# Released Qwen-Image-Edit-Plus sizes (diffusers' module constants).
CONTROL_AREA = 1024 * 1024
CONDITION_AREA = 384 * 384

LORA_META_FILE = "aesformer_lora.json"
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"

# Every linear layer of every transformer block: attention q/k/v/out, the
# added text-stream projections, both MLPs (image and text stream) and the
# two timestep-modulation projections.
DEFAULT_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
    "img_mod.1", "txt_mod.1",
)


class LoraBaseMismatch(ValueError):
    """A LoRA trained on one editor base was loaded onto another."""


def calculate_dimensions(area: int, ratio: float, multiple: int = 32) -> tuple[int, int]:
    """(width, height) of about ``area`` pixels with aspect ``ratio`` = w/h,
    each rounded to ``multiple`` (diffusers' rule, with the area a parameter)."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    w = max(multiple, round(width / multiple) * multiple)
    h = max(multiple, round(height / multiple) * multiple)
    return int(w), int(h)


# Aspect ratios (w/h) of the training target buckets: portrait to landscape.
TARGET_ASPECTS = (9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9)


def bucket_size(width: int, height: int, area: int, aspects=TARGET_ASPECTS) -> tuple[int, int]:
    """(w, h) of the training target for a width×height good image: the
    bucket whose aspect is nearest (in log ratio) at about ``area`` pixels,
    on the 32-pixel grid (3:4 at 1080×1440 gives 1088×1440)."""
    a = width / height
    best = min(aspects, key=lambda b: abs(math.log(b / a)))
    return calculate_dimensions(area, best)


def fit_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` centre-cropped to the aspect of ``size`` and resized to it."""
    from PIL import ImageOps

    return ImageOps.fit(image.convert("RGB"), size, Image.Resampling.BICUBIC)


def template_prefix_length(tokenizer: Any, template: str) -> int:
    """Tokens of ``template`` before its ``{}`` slot: the part of the text
    condition the pipeline drops. Computed, because diffusers' fixed 64 holds
    only for Qwen's own tokenizer."""
    prefix = template.split("{}", 1)[0]
    return len(tokenizer(prefix, add_special_tokens=False)["input_ids"])


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype '{dtype}'; use one of {', '.join(names)}")
    return names[dtype]


def resolve_device(device: Optional[str]) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def transformer_fingerprint(config: Any) -> str:
    """A short hash of the transformer's architecture: two editors with the
    same fingerprint accept the same LoRA, whatever path they were loaded from."""
    items = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    blob = json.dumps(items, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# diffusers keeps the two image areas as module constants read inside
# QwenImageEditPlusPipeline.__call__; they are set for the duration of a call
# under a lock so that editors with different areas can share a process.
_AREA_LOCK = threading.RLock()


@contextlib.contextmanager
def pipeline_areas(control_area: int, condition_area: int):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as mod

    with _AREA_LOCK:
        saved = mod.VAE_IMAGE_SIZE, mod.CONDITION_IMAGE_SIZE
        mod.VAE_IMAGE_SIZE, mod.CONDITION_IMAGE_SIZE = int(control_area), int(condition_area)
        try:
            yield
        finally:
            mod.VAE_IMAGE_SIZE, mod.CONDITION_IMAGE_SIZE = saved


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, h, w] normalised VAE latents → [B, (h/2)(w/2), 4C] tokens
    (the pipeline's own 2×2 packing)."""
    from diffusers import QwenImageEditPlusPipeline

    b, c, _, h, w = latents.shape
    return QwenImageEditPlusPipeline._pack_latents(latents[:, :, 0], b, c, h, w)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent grid of ``h``×``w``."""
    b, n, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, 1, h, w)


def transformer_forward(transformer: Any, noisy: torch.Tensor, control: torch.Tensor,
                        target_hw: tuple[int, int], control_hw: tuple[int, int],
                        prompt_embeds: torch.Tensor, prompt_mask: Optional[torch.Tensor],
                        t: torch.Tensor) -> torch.Tensor:
    """Velocity prediction for the packed noisy target tokens.

    ``noisy`` [B, N, 4C] and ``control`` [B, M, 4C] are packed latents of a
    target grid ``target_hw`` and control grid ``control_hw`` (latent h, w,
    before packing); ``t`` [B] in [0, 1]. The sequence is [noisy target |
    clean control] with per-image shapes for the rotary embedding; with
    ``zero_cond_t`` the transformer modulates control tokens with t = 0. The
    output is sliced back to the N target tokens, as the pipeline does.
    """
    (th, tw), (ch, cw) = target_hw, control_hw
    img_shapes = [[(1, th // 2, tw // 2), (1, ch // 2, cw // 2)]] * noisy.shape[0]
    out = transformer(
        hidden_states=torch.cat([noisy, control], dim=1),
        timestep=t.to(noisy.dtype),
        encoder_hidden_states=prompt_embeds,
        encoder_hidden_states_mask=prompt_mask,
        img_shapes=img_shapes,
        return_dict=False,
    )[0]
    return out[:, : noisy.shape[1]]


class Editor:
    """A Qwen-Image-Edit pipeline with the platform's sizes and LoRA checks.

    Use :meth:`load`; ``edit`` runs the full pipeline on one image.
    """

    def __init__(self, pipe: Any, *, name: str, control_area: int = CONTROL_AREA,
                 condition_area: int = CONDITION_AREA, lora: Optional[str] = None):
        self.pipe = pipe
        self.name = name
        self.control_area = int(control_area)
        self.condition_area = int(condition_area)
        self.lora: Optional[str] = None
        # the text condition drops the template's prefix: count it with this tokenizer
        pipe.prompt_template_encode_start_idx = template_prefix_length(pipe.tokenizer, pipe.prompt_template_encode)
        if lora:
            self.load_lora(lora)

    # ------------------------------------------------------------------ load
    @classmethod
    def load(cls, path: str, lora: Optional[str] = None, control_area: int = CONTROL_AREA,
             condition_area: int = CONDITION_AREA, dtype: Union[str, torch.dtype, None] = "float32",
             device: Optional[str] = "auto", name: Optional[str] = None,
             components: Optional[dict] = None, offload: bool = False) -> "Editor":
        """Load the pipeline from a local folder (or hub id) ``path``.

        ``components`` replaces loaded parts (e.g. a trained ``transformer``).
        ``name`` is the base's display name (default: ``path``). ``offload``
        keeps each model on the CPU until it runs (the 20B editor and its 7B
        text encoder do not fit one 48 GB GPU together).
        """
        from diffusers import QwenImageEditPlusPipeline

        from aesformer.storage import is_uri, local_copy

        name = name or str(path)
        if is_uri(path):  # a folder at a URI: this node's copy
            path = local_copy(path)
        local = Path(path).expanduser()
        looks_local = str(path).startswith((".", "/", "~")) or str(path).count("/") != 1
        if not local.exists() and looks_local:
            raise FileNotFoundError(f"editor model '{path}' is neither a local folder nor a hub id (owner/name)")
        torch_dtype = resolve_dtype(dtype)
        pipe = QwenImageEditPlusPipeline.from_pretrained(str(local if local.exists() else path),
                                                         dtype=torch_dtype, **(components or {}))
        dev = resolve_device(device)
        if offload and dev.startswith("cuda"):
            pipe.enable_model_cpu_offload(device=dev)
        else:
            pipe.to(dev)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, name=name, control_area=control_area,
                   condition_area=condition_area, lora=lora)

    @property
    def fingerprint(self) -> str:
        return transformer_fingerprint(self.pipe.transformer.config)

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    def load_lora(self, path: str, adapter_name: str = "aesformer") -> None:
        """Load a LoRA exported by :func:`save_lora`; a LoRA made for another
        base fails here with both names. ``path`` may be at a URI."""
        from aesformer.storage import is_uri, local_copy

        if is_uri(path):
            path = local_copy(path)
        folder = Path(path).expanduser()
        if not folder.exists():
            raise FileNotFoundError(f"LoRA '{path}' does not exist")
        meta_path = (folder if folder.is_dir() else folder.parent) / LORA_META_FILE
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("base_fingerprint") != self.fingerprint:
                raise LoraBaseMismatch(
                    f"LoRA '{path}' was trained on editor base '{meta.get('base_model')}' "
                    f"(architecture {meta.get('base_fingerprint')}), but this editor is '{self.name}' "
                    f"(architecture {self.fingerprint})")
        else:
            log.warning("LoRA %s has no %s: cannot check its base against '%s'", path, LORA_META_FILE, self.name)
        try:
            self.pipe.load_lora_weights(str(folder), adapter_name=adapter_name)
        except (RuntimeError, ValueError, KeyError) as e:
            raise LoraBaseMismatch(f"LoRA '{path}' does not fit editor base '{self.name}': {e}") from e
        self.lora = str(path)

    # ----------------------------------------------------------------- sizes
    def control_size(self, image: Image.Image) -> tuple[int, int]:
        """(w, h) of the control image the VAE sees."""
        return calculate_dimensions(self.control_area, image.width / image.height)

    def condition_size(self, image: Image.Image) -> tuple[int, int]:
        """(w, h) of the copy the vision-language text encoder sees."""
        return calculate_dimensions(self.condition_area, image.width / image.height)

    def output_size(self, image: Image.Image, height: Optional[int] = None,
                    width: Optional[int] = None) -> tuple[int, int]:
        """(w, h) of the edited image: the request rounded down to the 16-pixel
        grid, else the control area at the input's aspect (diffusers' rule)."""
        cw, ch = self.control_size(image)
        m = self.pipe.vae_scale_factor * 2
        w, h = (width or cw), (height or ch)
        return max(m, w // m * m), max(m, h // m * m)

    # ------------------------------------------------------ cache ingredients
    @torch.no_grad()
    def encode_prompt(self, control: Image.Image, prompt: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The text condition of ``prompt`` with ``control`` in it, as the
        pipeline builds it at inference: ([1, L, D] embeds, mask or None)."""
        cw, ch = self.condition_size(control)
        cond = self.pipe.image_processor.resize(control.convert("RGB"), ch, cw)
        return self.pipe.encode_prompt(prompt=prompt, image=[cond], device=self.device)

    @torch.no_grad()
    def encode_image(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        """Normalised VAE latents [1, C, 1, h, w] of ``image`` resized to
        width×height (the pipeline's preprocessing and VAE encoding)."""
        x = self.pipe.image_processor.preprocess(image.convert("RGB"), height, width).unsqueeze(2)
        x = x.to(device=self.device, dtype=self.pipe.vae.dtype)
        return self.pipe._encode_vae_image(x, generator=None)

    def encode_control(self, control: Image.Image) -> torch.Tensor:
        return self.encode_image(control, *self.control_size(control))

    # ------------------------------------------------------------------ edit
    def edit(self, image: Image.Image, prompt: str, seed: int = 0, steps: int = 40,
             true_cfg_scale: float = 4.0, negative_prompt: Optional[str] = " ",
             height: Optional[int] = None, width: Optional[int] = None) -> Image.Image:
        """Edit ``image`` following ``prompt``. True CFG runs only when
        ``true_cfg_scale`` > 1 and a negative prompt is given."""
        if int(steps) < 2:
            # the scheduler stretches its sigmas to a terminal value: undefined for one step
            raise ValueError(f"steps must be at least 2, got {steps}")
        image = image.convert("RGB")
        w, h = self.output_size(image, height, width)
        cfg = true_cfg_scale if negative_prompt is not None else 1.0
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        with pipeline_areas(self.control_area, self.condition_area):
            out = self.pipe(image=image, prompt=prompt, negative_prompt=negative_prompt if cfg > 1 else None,
                            true_cfg_scale=cfg, height=h, width=w, num_inference_steps=int(steps),
                            generator=generator)
        return out.images[0]


# -------------------------------------------------------------------- LoRA
def lora_config(rank: int = 16, alpha: float = 1.0, targets: tuple[str, ...] = DEFAULT_LORA_TARGETS,
                dropout: float = 0.0):
    """peft LoraConfig on the named linear layers: a name matches inside every
    transformer block (``attn.to_q``) or a top-level module (``proj_out``)."""
    from peft import LoraConfig

    names = "|".join(re.escape(t) for t in targets)
    pattern = rf"(transformer_blocks\.\d+\.)?({names})"
    return LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=dropout,
                      init_lora_weights=True, target_modules=pattern)


def save_lora(transformer: Any, folder: str, *, base_model: str, card: Optional[str] = None,
              extra: Optional[dict] = None) -> Path:
    """Export the transformer's LoRA in diffusers format (``pipe.load_lora_weights``
    reads it), with the base recorded for the load-time check and a model card."""
    from diffusers import QwenImageEditPlusPipeline
    from peft.utils import get_peft_model_state_dict

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(transformer)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    peft_cfg = transformer.peft_config[next(iter(transformer.peft_config))]
    meta = peft_cfg.to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    QwenImageEditPlusPipeline.save_lora_weights(out, transformer_lora_layers=state,
                                                transformer_lora_adapter_metadata=meta)
    info = {"base_model": base_model, "base_fingerprint": transformer_fingerprint(transformer.config),
            "rank": peft_cfg.r, "alpha": peft_cfg.lora_alpha, **(extra or {})}
    (out / LORA_META_FILE).write_text(json.dumps(info, indent=2, default=str))
    if card is not None:
        (out / "README.md").write_text(card)
    return out

"""Image scorers behind one interface, shared by VCMP's quality filter and evaluation.

A scorer is an :class:`ImageScorer`: ``scorer(images) -> np.ndarray`` of
scores on its own scale (``scale = (lo, hi)``: LAION aesthetic 1–10, Q-Align
1–5, ArtiMuse 0–100, the classical scorers 0–1), and
``scorer.normalised(images)`` maps them to [0, 1] (what VCMP's thresholds
read). :func:`load_scorer` builds one from a :class:`ScorerSpec`; when its
weights are absent it raises :class:`ScorerUnavailable` (a
``FileNotFoundError``) whose message is the reason, so a report can skip the
scorer and say why.

Kinds:

- ``classical:iqa``, ``classical:aesthetic`` — the no-model scorers of
  :mod:`aesformer.vcmp.quality` (sharpness, noise, colourfulness, ...);
- ``torchscript`` — a TorchScript regressor by path (see
  :class:`aesformer.vcmp.quality.TorchScriptScorer`);
- ``laion`` — LAION aesthetic predictor v2: the L2-normalised CLIP image
  embedding (open_clip; ``clip`` is a model name such as ``ViT-L-14`` or a
  JSON model config, ``clip_weights`` its checkpoint file or one of
  open_clip's pretrained tags for that model, such as ``openai``, fetched
  into the hub cache where the network allows) through the released MLP
  head (``weights``, a state dict with ``layers.{0,2,4,6,7}``);
- ``qalign`` — with ``trust_remote_code: true``, the released Q-Align
  checkpoint (``model``, e.g. ``q-future/one-align``) run by its own code:
  its ``score(images, task_=task, input_="image")`` gives the 1–5 score of
  ``task`` (``quality`` for IQA, ``aesthetics``); without it, Q-Align-style
  on any VLM: the expected quality level over the five levels 1 (bad) … 5
  (excellent), read from the first-token log-probs of the digits "1".."5"
  with the same expectation as the GRPO reward
  (:func:`aesformer.rewards.expected_score`);
- ``artimuse`` — an ArtiMuse scorer exported to TorchScript, by path, 0–100.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

KINDS = ("classical:iqa", "classical:aesthetic", "torchscript", "laion", "qalign", "artimuse")


class ScorerUnavailable(FileNotFoundError):
    """A scorer cannot be built here (its weights are absent); the message says why."""


@dataclass
class ScorerSpec:
    name: str = ""                       # the report's column (default: kind)
    kind: str = "classical:aesthetic"
    weights: Optional[str] = None        # laion head, torchscript/artimuse file
    clip: str = "ViT-L-14"               # laion: open_clip model name or a JSON model config
    clip_weights: Optional[str] = None   # laion: the CLIP checkpoint
    quick_gelu: bool = True              # laion: OpenAI's CLIP uses QuickGELU
    model: Optional[str] = None          # qalign: the VLM (path, hub id or tiny:<name>)
    engine: str = "hf"                   # qalign: hf | vllm
    trust_remote_code: bool = False      # qalign: the checkpoint's own code and score() (the released Q-Align)
    task: str = "quality"                # qalign with its own code: quality | aesthetics
    dtype: Optional[str] = None          # qalign with its own code (None: float16 on CUDA, float32 on CPU)
    max_pixels: Optional[int] = 200_704  # qalign: image pixels the VLM sees
    batch_size: int = 8
    device: str = "cpu"


class ImageScorer:
    """``fn(images) -> raw scores`` on ``scale``; see the module doc."""

    def __init__(self, name: str, fn: Callable[[Sequence[Any]], np.ndarray], scale: tuple[float, float],
                 settings: Optional[dict] = None):
        self.name, self.fn, self.scale = name, fn, (float(scale[0]), float(scale[1]))
        self.settings = settings or {}

    def __call__(self, images: Sequence[Any]) -> np.ndarray:
        if not len(images):
            return np.zeros(0)
        return np.asarray(self.fn(list(images)), dtype=float).reshape(len(images))

    def normalised(self, images: Sequence[Any]) -> np.ndarray:
        lo, hi = self.scale
        return np.clip((self(images) - lo) / max(1e-9, hi - lo), 0.0, 1.0)


def _need_file(path: Optional[str], what: str) -> Path:
    if not path:
        raise ScorerUnavailable(f"{what} is not set")
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise ScorerUnavailable(f"{what} '{path}' does not exist")
    return p


def load_scorer(spec: ScorerSpec, cache_dir: Optional[str] = None) -> ImageScorer:
    """The scorer a spec names; :class:`ScorerUnavailable` when its weights are absent
    (``cache_dir``: where ``tiny:`` models are cached)."""
    name = spec.name or spec.kind
    if spec.kind in ("classical:iqa", "classical:aesthetic"):
        from aesformer.vcmp.quality import CLASSICAL

        fn = CLASSICAL[spec.kind]
        return ImageScorer(name, lambda images: np.asarray([fn(im) for im in images], dtype=float), (0.0, 1.0),
                           {"kind": spec.kind})
    if spec.kind in ("torchscript", "artimuse"):
        from aesformer.vcmp.quality import TorchScriptScorer

        path = _need_file(spec.weights, f"{name}: weights")
        ts = TorchScriptScorer(str(path), device=spec.device)
        if spec.kind == "artimuse" and ts.range == (0.0, 1.0):
            ts.range = (0.0, 100.0)  # ArtiMuse scores on 0-100 unless its metadata says otherwise
        lo, hi = ts.range
        return ImageScorer(name, lambda images: lo + ts(images) * (hi - lo), (lo, hi),
                           {"kind": spec.kind, "weights": str(path)})
    if spec.kind == "laion":
        return _laion(spec, name)
    if spec.kind == "qalign":
        return _qalign(spec, name, cache_dir)
    raise ValueError(f"unknown scorer kind '{spec.kind}'; kinds are {', '.join(KINDS)}")


def scorer_spec(value: Any, name: str = "") -> ScorerSpec:
    """A :class:`ScorerSpec` from a spec, a mapping of its fields, or a name
    (``classical:iqa``, ``classical:aesthetic`` or a TorchScript file path)."""
    if isinstance(value, ScorerSpec):
        return value
    if isinstance(value, str):
        kind = value if value in ("classical:iqa", "classical:aesthetic") else "torchscript"
        return ScorerSpec(name=name or value, kind=kind, weights=None if kind != "torchscript" else value)
    if isinstance(value, dict) or hasattr(value, "items"):
        fields = dict(value.items())
        unknown = sorted(set(fields) - set(ScorerSpec.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown scorer field(s) {', '.join(unknown)}; fields are "
                             f"{', '.join(ScorerSpec.__dataclass_fields__)}")
        return ScorerSpec(**{"name": name, **fields})
    raise TypeError(f"a scorer is a name or a mapping of ScorerSpec fields, not {type(value).__name__}")


def scorer_from_name(name: str, device: str = "cpu", config_key: str = "quality.<scorer>") -> ImageScorer:
    """VCMP's scorer names: ``classical:iqa``, ``classical:aesthetic`` or a
    TorchScript file path (a missing path names the config key to fix)."""
    if name in ("classical:iqa", "classical:aesthetic"):
        return load_scorer(ScorerSpec(name=name, kind=name))
    if not Path(str(name)).expanduser().is_file():
        raise ScorerUnavailable(f"image scorer '{name}' (from {config_key}) is neither classical:iqa nor "
                                f"classical:aesthetic nor an existing TorchScript file")
    return load_scorer(ScorerSpec(name=str(name), kind="torchscript", weights=str(name), device=device))


# -- LAION aesthetic predictor v2 ---------------------------------------------------------

def aesthetic_head(dim: int = 768):
    """The LAION aesthetic predictor's MLP (same layer names as its released weights)."""
    import torch.nn as nn

    class AestheticHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

        def forward(self, x):
            return self.layers(x)

    return AestheticHead()


def _clip_model(spec: ScorerSpec, name: str):
    import open_clip

    model_name = spec.clip
    if str(spec.clip).endswith(".json"):
        cfg_path = _need_file(spec.clip, f"{name}: clip")
        open_clip.add_model_config(cfg_path)  # registered under the file's stem
        model_name = cfg_path.stem
    if spec.clip_weights and spec.clip_weights in open_clip.list_pretrained_tags_by_model(model_name):
        weights = spec.clip_weights  # a pretrained tag: open_clip fetches it into the hub cache
    else:
        weights = str(_need_file(spec.clip_weights, f"{name}: clip_weights"))
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=weights, force_quick_gelu=spec.quick_gelu, device=spec.device)
    except (OSError, RuntimeError) as e:  # a tag that cannot be fetched here
        raise ScorerUnavailable(f"{name}: CLIP weights '{weights}' of {model_name} cannot be loaded: {e}") from None
    return model.eval(), preprocess


def _laion(spec: ScorerSpec, name: str) -> ImageScorer:
    import torch

    head_path = _need_file(spec.weights, f"{name}: weights (the aesthetic head)")
    clip, preprocess = _clip_model(spec, name)
    state = torch.load(str(head_path), map_location="cpu", weights_only=True)
    head = aesthetic_head(int(state["layers.0.weight"].shape[1]))
    head.load_state_dict(state)
    head.eval().to(spec.device)

    def fn(images):
        out = []
        with torch.no_grad():
            for i in range(0, len(images), spec.batch_size):
                x = torch.stack([preprocess(im.convert("RGB")) for im in images[i:i + spec.batch_size]]).to(spec.device)
                emb = clip.encode_image(x).float()
                emb = emb / emb.norm(dim=-1, keepdim=True)
                out.append(head(emb).reshape(-1).cpu())
        return torch.cat(out).numpy()

    return ImageScorer(name, fn, (1.0, 10.0), {"kind": "laion", "clip": spec.clip, "clip_weights": spec.clip_weights,
                                               "weights": str(head_path)})


# -- Q-Align-style on any VLM -------------------------------------------------------------------

QALIGN_LEVELS = ("1", "2", "3", "4", "5")
QALIGN_PROMPT = ("Rate the aesthetic quality of this photo on five levels: 1 bad, 2 poor, 3 fair, 4 good, "
                 "5 excellent. Reply with a single digit from 1 to 5 and nothing else.")


def qalign_score(level_logprobs: Any) -> np.ndarray:
    """The expected level (1..5) from log-probs ``[B, 5]`` of the digits
    "1".."5": the reward's expectation over "0".."5" with "0" ruled out, ×5."""
    from aesformer.rewards import expected_score

    lp = np.asarray(level_logprobs, dtype=np.float64).reshape(-1, len(QALIGN_LEVELS))
    with_zero = np.concatenate([np.full((lp.shape[0], 1), -np.inf), lp], axis=1)
    return np.atleast_1d(expected_score(with_zero)) * 5.0


def _qalign(spec: ScorerSpec, name: str, cache_dir: Optional[str]) -> ImageScorer:
    from aesformer.engines import make_engine
    from aesformer.models import resolve_model

    if not spec.model:
        raise ScorerUnavailable(f"{name}: model is not set")
    if spec.trust_remote_code:
        return _qalign_own_code(spec, name, resolve_model(spec.model, cache_dir, f"{name}.model"))
    try:
        path = resolve_model(spec.model, cache_dir, f"{name}.model")
        options = dict(max_pixels=spec.max_pixels, batch_size=spec.batch_size) if spec.engine == "hf" else \
            dict(max_pixels=spec.max_pixels)
        engine = make_engine(spec.engine, path, **options)
    except OSError as e:  # a missing folder, or a hub id that cannot be fetched here
        raise ScorerUnavailable(f"{name}: model '{spec.model}' cannot be loaded: {e}") from None
    tok = engine.tokenizer() if callable(getattr(engine, "tokenizer", None)) else engine.tokenizer
    ids = [int(tok.encode(d, add_special_tokens=False)[0]) for d in QALIGN_LEVELS]

    def fn(images):
        lp = engine.score_tokens([{"images": [im.convert("RGB")], "text": QALIGN_PROMPT} for im in images], ids)
        return qalign_score(lp.numpy() if hasattr(lp, "numpy") else lp)

    return ImageScorer(name, fn, (1.0, 5.0), {"kind": "qalign", "model": spec.model, "engine": spec.engine})


QALIGN_TASKS = ("quality", "aesthetics")


def _qalign_own_code(spec: ScorerSpec, name: str, path: str) -> ImageScorer:
    """The released Q-Align (an mPLUG-Owl2 checkpoint with its modelling
    code) through its own ``score``: 1–5 for ``spec.task``."""
    import torch

    if spec.task not in QALIGN_TASKS:
        raise ValueError(f"{name}: task '{spec.task}' is not one of {', '.join(QALIGN_TASKS)}")
    dtype = spec.dtype or ("float16" if str(spec.device).startswith("cuda") else "float32")
    try:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=getattr(torch, dtype))
        model = model.to(spec.device).eval()
    except Exception as e:  # absent weights, or modelling code this transformers cannot run
        raise ScorerUnavailable(f"{name}: model '{spec.model}' cannot be loaded with its own code: "
                                f"{type(e).__name__}: {e}") from None
    if not callable(getattr(model, "score", None)):
        raise ScorerUnavailable(f"{name}: model '{spec.model}' has no score() of its own: it is not a Q-Align "
                                f"checkpoint (without trust_remote_code any VLM is read Q-Align-style)")

    def fn(images):
        out = []
        with torch.no_grad():
            for i in range(0, len(images), spec.batch_size):
                part = [im.convert("RGB") for im in images[i:i + spec.batch_size]]
                got = model.score(part, task_=spec.task, input_="image")
                out.append(torch.as_tensor(got).float().reshape(-1).cpu())
        return torch.cat(out).numpy()

    return ImageScorer(name, fn, (1.0, 5.0), {"kind": "qalign", "model": spec.model, "task": spec.task,
                                              "own_code": True})

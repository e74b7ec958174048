"""Stage 7, good-image scorers: image quality (IQA) and aesthetics, both
behind one interface, ``scorer(images) -> scores in [0, 1]``, chosen by name:

- ``classical:iqa`` — a no-reference quality estimate from sharpness
  (Laplacian energy), noise (residual of a median filter in flat areas),
  clipping and contrast;
- ``classical:aesthetic`` — colourfulness (Hasler & Süsstrunk), contrast,
  exposure balance and the spread of detail (a photo whose detail sits in a
  small part of the frame on a clean background scores higher);
- a path to a TorchScript regressor (``torch.jit.save``) taking
  ``[B, 3, S, S]`` floats in [0, 1] and returning ``[B]`` or ``[B, 1]``
  scores; a ``<path>.json`` beside it may give ``input_size``, ``mean``/``std``
  (per channel) and the raw ``range`` [lo, hi] mapped to [0, 1] (e.g. [1, 10]
  for a LAION-style aesthetic predictor).

The tiny profile uses the classical scorers, so thresholds act on
meaningful numbers. VCMP's quality filter takes its scorers as
:class:`aesformer.scorers.ScorerSpec` (:func:`quality_scorer`), the
interface evaluation scores with, so the a40 profile's learned scorers
(Q-Align, LAION aesthetic v2) are the same code in both.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

Scorer = Callable[[Sequence[Any]], np.ndarray]


def _grey(img: Any, width: int = 256) -> np.ndarray:
    import cv2

    arr = np.asarray(img.convert("RGB")) if hasattr(img, "convert") else np.asarray(img)
    g = cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
    h = max(8, round(g.shape[0] * width / g.shape[1]))
    return cv2.resize(g, (width, h), interpolation=cv2.INTER_AREA).astype(np.float32)


def _rgb(img: Any, width: int = 256) -> np.ndarray:
    import cv2

    arr = np.asarray(img.convert("RGB")) if hasattr(img, "convert") else np.asarray(img)
    h = max(8, round(arr.shape[0] * width / arr.shape[1]))
    return cv2.resize(arr, (width, h), interpolation=cv2.INTER_AREA).astype(np.float32)


def classical_iqa(img: Any) -> float:
    """No-reference quality in [0, 1] (see module doc)."""
    import cv2

    g = _grey(img)
    lap = float(cv2.Laplacian(g, cv2.CV_32F).var())
    sharp = 1.0 - np.exp(-lap / 150.0)
    resid = np.abs(g - cv2.medianBlur(g.astype(np.uint8), 3).astype(np.float32))
    flat = cv2.GaussianBlur(np.abs(cv2.Sobel(g, cv2.CV_32F, 1, 1)), (5, 5), 0) < 8
    noise = float(np.median(resid[flat])) if flat.any() else float(np.median(resid))
    noise_ok = float(np.exp(-noise / 3.0))
    clipped = float(((g < 3) | (g > 252)).mean())
    contrast = float(min(1.0, g.std() / 55.0))
    return float(np.clip(0.5 * sharp + 0.2 * noise_ok + 0.15 * (1 - clipped) + 0.15 * contrast, 0, 1))


def classical_aesthetic(img: Any) -> float:
    """Aesthetic appeal in [0, 1] from simple photographic statistics."""
    import cv2

    rgb = _rgb(img)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    colourful = (np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)) / 100.0
    grey = rgb.mean(axis=2)
    contrast = min(1.0, grey.std() / 60.0)
    exposure = 1.0 - min(1.0, abs(grey.mean() / 255.0 - 0.5) * 2)
    edges = np.abs(cv2.Laplacian(grey, cv2.CV_32F))
    k = max(1, edges.size // 10)
    top = np.partition(edges.ravel(), -k)[-k:].sum() / max(1e-6, edges.sum())  # detail concentration
    return float(np.clip(0.3 * min(1.0, colourful) + 0.25 * contrast + 0.25 * exposure + 0.2 * min(1.0, top), 0, 1))


class TorchScriptScorer:
    """A TorchScript regressor loaded by path (see module doc)."""

    def __init__(self, path: str, device: str = "cpu"):
        import torch

        self.path = str(path)
        meta_path = Path(str(path) + ".json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        self.size = int(meta.get("input_size", 224))
        self.mean = np.asarray(meta.get("mean", [0.0, 0.0, 0.0]), dtype=np.float32)
        self.std = np.asarray(meta.get("std", [1.0, 1.0, 1.0]), dtype=np.float32)
        self.range = tuple(meta.get("range", [0.0, 1.0]))
        self.device = device
        self.model = torch.jit.load(self.path, map_location=device).eval()

    def __call__(self, images: Sequence[Any]) -> np.ndarray:
        import torch
        from PIL import Image

        if not images:
            return np.zeros(0)
        arrs = [np.asarray(im.convert("RGB").resize((self.size, self.size), Image.BICUBIC), dtype=np.float32) / 255.0
                for im in images]
        x = (np.stack(arrs) - self.mean) / self.std
        with torch.no_grad():
            y = self.model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(self.device))
        y = y.reshape(len(images), -1)[:, 0].float().cpu().numpy()
        lo, hi = self.range
        return np.clip((y - lo) / max(1e-9, hi - lo), 0.0, 1.0)


CLASSICAL = {"classical:iqa": classical_iqa, "classical:aesthetic": classical_aesthetic}


def quality_scorer(spec: Any, device: Optional[str] = None, cache_dir: Optional[str] = None,
                   config_key: str = "quality.<scorer>"):
    """The :class:`aesformer.scorers.ImageScorer` of VCMP's quality filter from
    a spec (or a name, see :func:`aesformer.scorers.scorer_spec`); ``device``
    (the pool's) replaces the spec's ``cpu`` default. Raises
    :class:`aesformer.scorers.ScorerUnavailable` naming ``config_key`` when
    its weights are absent."""
    import dataclasses

    from aesformer.scorers import ScorerUnavailable, load_scorer as build, scorer_spec

    spec = scorer_spec(spec, name=config_key.rsplit(".", 1)[-1])
    if device and spec.device == "cpu":
        spec = dataclasses.replace(spec, device=device)
    try:
        return build(spec, cache_dir=cache_dir)
    except ScorerUnavailable as e:
        raise ScorerUnavailable(f"{config_key}: {e}") from None


def load_scorer(name: str, device: str = "cpu", config_key: str = "quality.<scorer>") -> Scorer:
    """A scorer by name: ``classical:iqa``, ``classical:aesthetic`` or a
    TorchScript file path, through the scorer interface evaluation uses
    (:mod:`aesformer.scorers`), as scores in [0, 1]. A missing path raises
    FileNotFoundError naming the config key to fix."""
    from aesformer.scorers import scorer_from_name

    return scorer_from_name(name, device=device, config_key=config_key).normalised

"""Flow-matching math of the editor's training (pure tensor functions).

Sign convention (the one diffusers' ``FlowMatchEulerDiscreteScheduler``
follows, so the trained model plugs into ``QwenImageEditPlusPipeline``
unchanged): t ∈ [0, 1] is the noise level (the scheduler's sigma),

    x_t = (1 − t) · x0 + t · noise          (t = 0: the clean latent, t = 1: pure noise)

and the model predicts the velocity d x_t / d t = noise − x0. The scheduler's
Euler step ``x ← x + (t_next − t) · v`` then walks from noise (t = 1) to the
image (t = 0). The paper writes the same path with t' = 1 − t, x1 = noise and
v' = x0 − x1 = −v: identical training, opposite labels.

Timesteps follow the released ``qwen_shift`` sampler: t = sigmoid(N(0, 1)),
then shifted towards noise by a factor that grows with the target's size
(more tokens need more noise to destroy the image):
mu = 0.5 + 0.4 · (tokens − 256) / (8192 − 256), shift = e^mu,
t ← t · shift / (1 + (shift − 1) · t), with tokens = (H/16)·(W/16). This is
the scheduler's exponential time shift with that mu.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

BASE_TOKENS, MAX_TOKENS = 256, 8192
BASE_SHIFT, MAX_SHIFT = 0.5, 0.9
# Loss is also logged per timestep bucket: [0, .25), [.25, .5), [.5, .75), [.75, 1].
T_BUCKETS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


def image_tokens(height: int, width: int) -> int:
    """Packed latent tokens of a height×width target: (H/16)·(W/16)."""
    return (int(height) // 16) * (int(width) // 16)


def shift_mu(tokens: float) -> float:
    """The resolution-dependent mu: 0.5 at 256 tokens, 0.9 at 8192 (linear)."""
    return BASE_SHIFT + (MAX_SHIFT - BASE_SHIFT) * (tokens - BASE_TOKENS) / (MAX_TOKENS - BASE_TOKENS)


def shift_timesteps(t: torch.Tensor, tokens: float) -> torch.Tensor:
    """t · s / (1 + (s − 1) · t) with s = e^mu(tokens)."""
    s = math.exp(shift_mu(tokens))
    return t * s / (1 + (s - 1) * t)


def sample_timesteps(batch: int, height: int, width: int, generator: Optional[torch.Generator] = None,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """``qwen_shift`` timesteps [batch] for a height×width target (pixels)."""
    u = torch.randn(batch, generator=generator, device="cpu" if generator is not None else device)
    return shift_timesteps(torch.sigmoid(u), image_tokens(height, width)).to(device or u.device)


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def noisy_latent(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − t) · x0 + t · noise, t [B] broadcast over the other dims."""
    t = _expand(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict: noise − x0."""
    return noise - x0


def flow_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Plain MSE in fp32; ``reduction="none"`` gives one value per sample."""
    err = (pred.float() - target.float()) ** 2
    if reduction == "none":
        return err.flatten(1).mean(1)
    return err.mean()


def timestep_bucket(t: float, edges: Sequence[float] = T_BUCKETS) -> str:
    """The name of t's bucket, e.g. ``t0.25-0.50`` (the last bucket includes 1)."""
    for lo, hi in zip(edges[:-1], edges[1:]):
        if lo <= t < hi or (hi == edges[-1] and t == hi):
            return f"t{lo:.2f}-{hi:.2f}"
    raise ValueError(f"timestep {t} is outside [{edges[0]}, {edges[-1]}]")

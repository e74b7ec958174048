"""GRPO math on per-token tensors: group advantages, KL estimators, masked
aggregation, the clipped policy loss, and token log-probs / entropy.

Conventions: per-token tensors have shape [B, T] (B sequences, T response
positions); ``mask`` is 1 on response tokens that count and 0 on padding.
Rewards and advantages are per sequence ([B]) unless stated otherwise.
Everything here is a pure function of tensors; the learner, reference and
rollout actors call it. Importing the module does not import torch (a job
checks the names below in its config before anything heavy loads).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean")
KL_KINDS = {"k1": "k1", "kl": "k1", "k2": "k2", "mse": "k2", "k3": "k3", "low_var_kl": "k3"}


def group_advantages(rewards: Any, group_size: int, eps: float = 1e-6, scale: bool = True) -> torch.Tensor:
    """Per-sample advantages from rewards laid out as consecutive groups.

    ``rewards`` has N = G·group_size entries, the group_size samples of each
    prompt next to each other. Returns (r − group mean) / (group std + eps)
    with the Bessel-corrected std (as the released training), or r − group
    mean when ``scale`` is False (Dr. GRPO). A group of identical rewards
    gives zeros; a group of one sample gives zero.
    """
    import torch

    r = torch.as_tensor(rewards, dtype=torch.float32).flatten()
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    groups = r.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        if group_size > 1:
            std = groups.std(dim=1, keepdim=True, unbiased=True)
        else:  # one sample: nothing to compare against
            std = torch.zeros_like(centred)
        centred = centred / (std + eps)
    return centred.flatten()


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "low_var_kl") -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from log-probs of the sampled tokens.

    k1 ("kl") = logp − ref; k2 ("mse") = ½(logp − ref)²; k3 ("low_var_kl") =
    exp(ref − logp) − (ref − logp) − 1, with ref − logp clamped to [−20, 20]
    and the result to [−10, 10] (as the released training).
    """
    import torch

    k = KL_KINDS.get(kind)
    if k is None:
        raise ValueError(f"unknown KL estimator '{kind}'; choose one of {', '.join(KL_KINDS)}")
    diff = logp - ref_logp
    if k == "k1":
        return diff
    if k == "k2":
        return 0.5 * diff.square()
    log_ratio = torch.clamp(ref_logp - logp, min=-20.0, max=20.0)
    return torch.clamp(torch.exp(log_ratio) - log_ratio - 1.0, min=-10.0, max=10.0)


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              normalizer: Optional[float] = None) -> torch.Tensor:
    """Reduce per-token values [B, T] to a scalar over the unmasked tokens.

    "token-mean": sum of unmasked values / number of unmasked tokens in the
    batch (every token weighs the same). ``normalizer``, if given, replaces
    that count — pass the token count of the whole update batch when it is
    split into micro-batches or across ranks, so the summed micro-batch
    losses equal the token-mean of the whole batch.
    "seq-mean-token-mean": mean over each sequence's unmasked tokens, then
    mean over the sequences that have any (every sequence weighs the same).
    An all-masked input gives 0.
    """
    import torch

    mask = mask.to(values.dtype)
    if values.shape != mask.shape:
        values = values.expand_as(mask)
    if mode == "token-mean":
        count = mask.sum() if normalizer is None else torch.as_tensor(normalizer, dtype=values.dtype)
        return (values * mask).sum() / torch.clamp(count, min=1.0)
    if mode == "seq-mean-token-mean":
        per_seq_count = mask.sum(dim=-1)
        per_seq = (values * mask).sum(dim=-1) / torch.clamp(per_seq_count, min=1.0)
        has_tokens = (per_seq_count > 0).to(values.dtype)
        return (per_seq * has_tokens).sum() / torch.clamp(has_tokens.sum(), min=1.0)
    raise ValueError(f"unknown aggregation mode '{mode}'; choose one of {', '.join(AGG_MODES)}")


def _per_token(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if advantages.dim() == like.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    return advantages.to(like.dtype).expand_as(like)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_ratio_low: float = 0.2, clip_ratio_high: Optional[float] = 0.3, dual_clip: Optional[float] = 3.0,
                mode: str = "token-mean", normalizer: Optional[float] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clipped surrogate with an asymmetric clip range and dual clip,
    aggregated over response tokens (defaults: the released training's 0.2,
    0.3 and 3.0).

    Per token, with ρ = exp(logp − old_logp):

    - clipped = max(−A·ρ, −A·clip(ρ, 1−ε_low, 1+ε_high)), ε_high =
      ``clip_ratio_high`` (None: ``clip_ratio_low``);
    - for A < 0 and ``dual_clip`` = c (0 or None: off), the loss is further
      capped at −A·c = c·|A|: a token whose ratio grew far past the range
      while its advantage is negative stops pushing (dual-clip PPO).

    On fully on-policy data (logp == old_logp) the gradient is that of
    −A·logπ averaged over tokens (the paper's eq. 2). ``advantages`` is [B]
    (one value per sequence, broadcast over its tokens) or [B, T].

    Returns (loss, metrics) with metrics ``clip_frac`` (share of tokens where
    the clipped ratio was taken), ``dual_clip_frac`` (share where the dual
    clip's cap was taken) and ``approx_kl`` (token-mean of old_logp − logp),
    as floats.
    """
    import torch

    high = clip_ratio_low if clip_ratio_high is None else clip_ratio_high
    if not 0.0 <= clip_ratio_low < 1.0 or high < 0.0:
        raise ValueError(f"clip ratios must satisfy 0 <= low < 1 and high >= 0, got low={clip_ratio_low}, high={high}")
    if dual_clip and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be greater than 1 (or 0 to turn it off), got {dual_clip}")
    adv = _per_token(torch.as_tensor(advantages, device=logp.device), logp)
    log_ratio = torch.clamp(logp - old_logp, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    dual_taken = torch.zeros_like(per_token, dtype=torch.bool)
    if dual_clip:
        cap = -adv * float(dual_clip)
        dual_taken = (adv < 0) & (per_token > cap)
        per_token = torch.where(dual_taken, cap, per_token)
    loss = aggregate(per_token, mask, mode, normalizer=normalizer)
    with torch.no_grad():
        metrics = {
            "clip_frac": float(aggregate((clipped > unclipped).to(logp.dtype), mask, "token-mean")),
            "dual_clip_frac": float(aggregate(dual_taken.to(logp.dtype), mask, "token-mean")),
            "approx_kl": float(aggregate(-log_ratio, mask, "token-mean")),
        }
    return loss, metrics


def kl_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, kind: str = "low_var_kl",
            mode: str = "token-mean", normalizer: Optional[float] = None) -> torch.Tensor:
    """The KL term of the loss: :func:`kl_penalty` aggregated like the policy loss."""
    return aggregate(kl_penalty(logp, ref_logp, kind), mask, mode, normalizer=normalizer)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, *, kl_coef: float, kl_estimator: str = "low_var_kl", mode: str = "token-mean",
              clip_ratio_low: float = 0.2, clip_ratio_high: Optional[float] = 0.3, dual_clip: Optional[float] = 3.0,
              batch_tokens: float, batch_sequences: float, sequences: float) -> tuple[torch.Tensor, dict]:
    """GRPO-A's loss on one micro-batch of a mini-batch: the clipped policy
    term plus ``kl_coef`` times the KL term, each aggregated like the other.

    The micro-batches of a mini-batch (across steps of accumulation and
    ranks) add up to the mini-batch's loss: with ``token-mean`` every token
    is divided by ``batch_tokens``, the mini-batch's response tokens; with
    ``seq-mean-token-mean`` the micro-batch's mean counts by its
    ``sequences`` out of ``batch_sequences``.

    Returns (loss, parts): ``pg_loss`` (the policy term's share, a float),
    ``kl_tokens`` (per-token KL, detached) and the policy term's metrics.
    """
    if mode == "token-mean":
        norm, share = {"normalizer": float(batch_tokens)}, 1.0
    else:
        norm, share = {}, float(sequences) / max(1.0, float(batch_sequences))
    pg, metrics = policy_loss(logp, old_logp, advantages, mask, clip_ratio_low=clip_ratio_low,
                              clip_ratio_high=clip_ratio_high, dual_clip=dual_clip, mode=mode, **norm)
    kl_tokens = kl_penalty(logp, ref_logp, kl_estimator)
    loss = (pg + kl_coef * aggregate(kl_tokens, mask, mode, **norm)) * share
    return loss, {"pg_loss": float(pg) * share, "kl_tokens": kl_tokens.detach(), **metrics}


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(label) at each position: logits [B, T, V], labels [B, T] → [B, T].

    Labels that are negative (e.g. −100, "ignore") give 0; mask them out.
    Computed in float32 as logit − logsumexp, without a full log-softmax copy.
    """
    import torch

    safe = labels.clamp(min=0).unsqueeze(-1)
    logits = logits.float()
    picked = logits.gather(-1, safe).squeeze(-1)
    out = picked - torch.logsumexp(logits, dim=-1)
    return torch.where(labels >= 0, out, torch.zeros_like(out))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax at each position: [..., V] → [...]."""
    import torch

    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    probs = torch.exp(logits - lse)
    return lse.squeeze(-1) - (probs * logits).sum(-1)


def masked_entropy(logits: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """Mean entropy over the unmasked positions (a rollout health metric)."""
    return aggregate(entropy_from_logits(logits), mask, mode)

"""Each prompt's forward pass once, its continuations batched.

GRPO-A asks the same prompt (a photo and the instruction) for ``n`` samples,
then scores those ``n`` responses under the reference and the learner, and
the judge reads ``n`` plans after the same instructions and photo. Running
every row as a full sequence computes the shared prompt ``n`` times, and
padding rows of mixed length to the longest computes padding as if it were
text. Here a prompt runs once (keeping its key/value cache and the logits of
its last position), and its continuations run as one batch on copies of that
cache, right-padded, with the positions the model would have given them in a
single sequence. Batches are formed by :func:`length_buckets`, so a batch
never costs much more than its rows one at a time.

The functions take a transformers model (or a DeepSpeed engine around one) and
work with or without gradients: the learner backpropagates through both the
prompt pass and the continuation pass.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Optional, Sequence

# A batch's padded cost (rows x longest) may exceed its rows' own tokens by this fraction
PADDING_SLACK = 0.25
# Tokens of one batch: past this, a batch of long rows gains nothing from its
# size (a forward pass is compute-bound) and its attention scores, which a
# padding mask makes the kernel hold in memory, only cost
BATCH_TOKENS = 2048


def length_buckets(lengths: Sequence[int], max_batch: int, slack: float = PADDING_SLACK,
                   max_tokens: int = BATCH_TOKENS) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches of at most ``max_batch``
    rows and ``max_tokens`` padded tokens (a longer row alone), by length, so
    that each batch's padded cost (size x its longest) is at most
    ``1 + slack`` times the sum of its lengths. Order within the result:
    shortest first."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        n = max(1, int(lengths[i]))
        size = len(current) + 1
        if current and (size > max_batch or size * n > (1 + slack) * (total + n) or size * n > max_tokens):
            out.append(current)
            current, total = [], 0
        current.append(i)
        total += n
    if current:
        out.append(current)
    return out


def _inner(model: Any) -> Any:
    """The transformers model behind a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def cache_argument(model: Any) -> str:
    """The name under which the model's forward takes a key/value cache:
    ``cache`` from transformers 5.24 on, ``past_key_values`` before (the GPU
    environment's pin). A name the forward does not know would be swallowed
    by its ``**kwargs``, and every continuation would run without its prompt."""
    return _cache_argument(type(_inner(model)))


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _device(model: Any):
    return next(_inner(model).parameters()).device


@dataclass
class PromptState:
    """What a prompt pass leaves for its continuations: the key/value cache
    (one row per prompt), the logits of each prompt's last position [B, V],
    the attention mask of the prompts [B, L], each prompt's real token count
    [B] and, for models with multimodal rotary positions, the offset between
    a token's index and its position [B, 1] (None otherwise)."""

    cache: Any
    last_logits: Any
    mask: Any
    real_len: Any
    rope_deltas: Optional[Any]


def prompt_pass(model: Any, enc: dict) -> PromptState:
    """One forward pass over a batch of (left-padded) prompts: the
    processor's tensors ``enc`` (input ids, attention mask, vision inputs)."""
    device = _device(model)
    enc = {k: v.to(device) if hasattr(v, "to") else v for k, v in enc.items()}
    holder = getattr(_inner(model), "model", None)
    if getattr(holder, "rope_deltas", None) is not None:
        holder.rope_deltas = None  # left from an earlier pass: this one sets its own, or none (text only)
    out = model(**enc, use_cache=True, logits_to_keep=1)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    # models with multimodal rotary positions (Qwen-VL) keep, after a prompt
    # pass, how far text positions are shifted by the images before them
    deltas = getattr(getattr(_inner(model), "model", None), "rope_deltas", None)
    mask = enc["attention_mask"]
    return PromptState(cache=cache, last_logits=out.logits[:, -1, :], mask=mask, real_len=mask.sum(dim=1),
                       rope_deltas=None if deltas is None else deltas.clone())


def continuation_positions(state: PromptState, rows: Any, width: int, start: int = 0) -> Any:
    """Positions of ``width`` continuation tokens (from the ``start``-th one
    after the prompt) for continuation rows of prompts ``rows``: [B, W], or
    [3, B, W] for multimodal rotary positions (text tokens use the same
    position on all three axes)."""
    import torch

    steps = torch.arange(start, start + width, device=state.real_len.device)
    if state.rope_deltas is None:
        # plain positions count the prompt's padding too (a constant shift per row, which rotary
        # attention does not see): continue after the padded prompt
        return (state.mask.shape[1] + steps).unsqueeze(0).expand(len(rows), -1)
    # multimodal positions start at the first real token; the delta adds the images' shift
    pos = state.real_len[rows].unsqueeze(1) + steps.unsqueeze(0)
    pos = pos + state.rope_deltas.to(pos.device)[rows].view(-1, 1)
    return pos.unsqueeze(0).expand(3, -1, -1)


def select_cache(model: Any, cache: Any, rows: Any) -> Any:
    """A new cache holding prompt rows ``rows`` (repeats allowed), leaving
    ``cache`` as it was (it may serve several continuation batches)."""
    from transformers import DynamicCache

    layers = [(layer.keys[rows], layer.values[rows]) for layer in cache.layers]
    return DynamicCache(ddp_cache_data=layers, config=_inner(model).config)


def continue_pass(model: Any, state: PromptState, rows: Any, tokens: Any, token_mask: Any,
                  cache: Any = None, start: int = 0, logits_to_keep: int = 0):
    """Logits [N, S, V] of ``tokens`` [N, S] (right-padded; ``token_mask``
    marks the real ones) continuing prompts ``rows`` [N] of ``state``, from
    the ``start``-th token after the prompt. ``cache`` (already holding those
    rows) is extended in place; default: a fresh copy of the prompts' cache.
    Returns (logits, cache)."""
    import torch

    device = _device(model)
    rows = torch.as_tensor(rows, dtype=torch.long, device=state.mask.device)
    if cache is None:
        cache = select_cache(model, state.cache, rows)
    prefix = state.mask[rows]
    if start:
        prefix = torch.cat([prefix, torch.ones(len(rows), start, dtype=prefix.dtype, device=prefix.device)], dim=1)
    mask = torch.cat([prefix, token_mask.to(prefix.dtype).to(prefix.device)], dim=1)
    positions = continuation_positions(state, rows, tokens.shape[1], start)
    out = model(input_ids=tokens.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                use_cache=True, logits_to_keep=logits_to_keep, **{cache_argument(model): cache})
    return out.logits, cache


def prompt_groups(keys: Sequence[Any]) -> list[list[int]]:
    """Indices of equal keys, in order of first appearance."""
    groups: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return list(groups.values())

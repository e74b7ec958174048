"""Model names → local paths, and the loading/prompting helpers every VLM user shares.

Models are named in config (a local path, a hub id, or ``tiny:<key>`` for the
offline tiny models); :func:`resolve_model` turns a name into something
``from_pretrained`` accepts. The rest builds inputs with the processor's own
chat template, so the same code serves the tiny and the real Qwen-VL models.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from aesformer.rewards import SCORE_TOKENS  # the judge digits, defined once

IGNORE_INDEX = -100

# owner/name or a bare name, as the hub spells repositories.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


class ModelNotFoundError(FileNotFoundError):
    """A configured model name that is neither a local folder nor a usable hub id."""


# ---------------------------------------------------------------------------
# Names → paths
# ---------------------------------------------------------------------------
def resolve_model(name: str, cache_dir: Optional[str] = None, config_key: str = "models.<role>") -> str:
    """``tiny:<key>`` → the cached tiny model (built on first use); an existing
    local path → itself (absolute); a hub id → unchanged.

    A path that does not exist raises :class:`ModelNotFoundError` naming the
    model and the config key to fix (``config_key``, e.g. ``models.thinker``).
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFoundError(f"empty model name; set {config_key} to a local path, a hub id or tiny:<name>")
    name = name.strip()
    from aesformer import storage

    if storage.is_uri(name):  # a folder at a URI: each node copies it into its cache before loading
        if not storage.is_dir(name):
            raise ModelNotFoundError(f"model '{name}' (from {config_key}) is not a folder at that URI; set "
                                     f"{config_key}=<local folder | URI of a model folder | hub id | tiny:<name>>")
        return name
    if name.startswith("tiny:"):
        from aesformer.tiny import MODEL_KEYS, ensure_tiny_models

        key = name[len("tiny:"):]
        if key not in MODEL_KEYS + ("tokenizer",):
            raise ModelNotFoundError(
                f"unknown tiny model '{name}' (from {config_key}); available: "
                + ", ".join(f"tiny:{k}" for k in MODEL_KEYS))
        return ensure_tiny_models(cache_dir)[key]
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    # "owner/name" (or a bare "name") may be a hub id; anything else that does
    # not exist (absolute, ./relative, ~, deeper paths) can only be a missing folder.
    looks_like_path = name.startswith((".", "~", "/", "\\")) or not _HUB_ID.match(name)
    if looks_like_path:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        raise ModelNotFoundError(
            f"model '{name}' (from {config_key}) is not an existing local path"
            + (" and the hub is offline (HF_HUB_OFFLINE=1)" if offline else "")
            + f"; set {config_key}=<local folder | hub id | tiny:thinker|judge|editor|whisper>")
    return name


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
def load_vlm(path: str, dtype: Any = None, device: str = "cpu"):
    """``(model, processor)`` for a Qwen-VL checkpoint (Qwen3-VL or Qwen2.5-VL, tiny or real),
    in eval mode. ``dtype`` defaults to float32."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = torch.float32 if dtype is None else dtype
    from aesformer.storage import local_copy

    path = local_copy(path)  # a folder at a URI: this node's copy
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def _tokenizer(processor_or_tokenizer: Any) -> Any:
    return getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)


def add_plan_tokens(model: Any, processor: Any, pad_to_multiple_of: int = 64) -> int:
    """Add the plan's tag tokens to the tokenizer and grow the model's embeddings.

    Decision: the tags are added as *non-special* added tokens. They are still
    matched whole (never split by the BPE), and they survive decoding with
    ``skip_special_tokens=True`` — the default of vLLM and of most callers —
    so a generated plan decodes with its tags and parses.

    The input embeddings and lm_head grow together (tied weights are handled by
    transformers); new rows start at the mean of the old ones. The embedding
    never shrinks: real Qwen checkpoints already have spare rows past the
    tokenizer's length. Returns how many tokens were new to the tokenizer.
    """
    from aesformer.actions import add_plan_tokens as add_tag_tokens

    tokenizer = _tokenizer(processor)
    added = add_tag_tokens(tokenizer)
    needed = len(tokenizer)
    current = model.get_input_embeddings().weight.shape[0]
    if needed > current:
        model.resize_token_embeddings(needed, pad_to_multiple_of=pad_to_multiple_of)
    return added


# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------
def _messages(instruction: str, response: Optional[str] = None, system: Optional[str] = None,
              with_image: bool = True) -> list[dict]:
    messages = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    image_part = [{"type": "image"}] if with_image else []
    messages.append({"role": "user", "content": image_part + [{"type": "text", "text": instruction}]})
    if response is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    return messages


def prompt_text(processor: Any, instruction: str, system: Optional[str] = None, with_image: bool = True) -> str:
    """The chat-templated prompt (photo + instruction), ending with the assistant header."""
    return processor.apply_chat_template(_messages(instruction, system=system, with_image=with_image),
                                         tokenize=False, add_generation_prompt=True)


def _images(images: Optional[list]) -> Optional[list]:
    return None if images is None or all(i is None for i in images) else images


def chat_inputs(processor: Any, image: Any, instruction: str, response: Optional[str] = None,
                system: Optional[str] = None):
    """Model inputs (batch of one) for ``photo + instruction [→ response]``.

    Uses the processor's own chat template; ``image=None`` gives a text-only
    prompt. With ``response``, adds ``labels``: -100 on the prompt, the
    response's token ids after it, ending with the turn's ``<|im_end|>`` (the
    template's trailing newline is not trained on).
    """
    with_image = image is not None
    images = [image] if with_image else None
    prompt = prompt_text(processor, instruction, system, with_image)
    if response is None:
        return processor(text=[prompt], images=images, return_tensors="pt")
    full = processor.apply_chat_template(_messages(instruction, response, system, with_image), tokenize=False,
                                         add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with and without a response")
    tokenizer = _tokenizer(processor)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    inputs = processor(text=[full], images=images, return_tensors="pt")
    ids = inputs["input_ids"][0]
    # The response starts after the prompt; count the prompt's tokens from the
    # response side (the response text tokenises alone exactly as in context,
    # since the prompt ends at a newline), and check it.
    tail = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    start = len(ids) - len(tail)
    if tail and ids[start:].tolist() != tail:
        # Fall back to tokenising the prompt itself (exact, costs a second pass).
        start = processor(text=[prompt], images=images, return_tensors="pt")["input_ids"].shape[1]
    ends = (ids == end).nonzero().flatten().tolist()
    stop = ends[-1] + 1 if ends and ends[-1] >= start else len(ids)
    labels = ids.clone().fill_(IGNORE_INDEX)
    labels[start:stop] = ids[start:stop]
    inputs["labels"] = labels.unsqueeze(0)
    return inputs


def generation_prompt_inputs(processor: Any, images: Optional[Sequence[Any]], instruction: str | Sequence[str],
                             system: Optional[str] = None):
    """Batched prompts for ``generate``: one photo each with the instruction
    (one string for all, or one per photo), left-padded. ``images=None`` (or
    all None) with a list of instructions gives text-only prompts."""
    if images is None:
        if isinstance(instruction, str):
            instruction = [instruction]
        images = [None] * len(instruction)
    images = list(images)
    instructions = [instruction] * len(images) if isinstance(instruction, str) else list(instruction)
    if len(instructions) != len(images):
        raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
    with_image = _images(images) is not None
    if with_image and any(i is None for i in images):
        raise ValueError("a batch mixes prompts with and without a photo; batch them separately")
    texts = [prompt_text(processor, ins, system, with_image) for ins in instructions]
    tokenizer = _tokenizer(processor)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"   # generation appends on the right
    try:
        return processor(text=texts, images=images if with_image else None, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side


def score_token_ids(tokenizer: Any) -> list[int]:
    """Ids of "0".."5"; each must be exactly one token (a judge reads its
    expected score from their logits at the first generated position)."""
    tokenizer = _tokenizer(tokenizer)
    ids = []
    for digit in SCORE_TOKENS:
        enc = tokenizer.encode(digit, add_special_tokens=False)
        if len(enc) != 1:
            raise AssertionError(f"score token {digit!r} is {len(enc)} tokens {enc} in this tokenizer")
        ids.append(enc[0])
    return ids


# ---------------------------------------------------------------------------
# Models on a cluster
# ---------------------------------------------------------------------------
def model_status(resolved: str) -> Optional[str]:
    """Why ``resolved`` (what :func:`resolve_model` returned on the driver)
    cannot be loaded on this node, or None when it can: a local folder must
    exist here with a config; a hub id must be in this node's Hugging Face
    cache, unless the hub is reachable (not HF_HUB_OFFLINE), when it
    downloads once into the cache."""
    from aesformer import storage

    if storage.is_uri(resolved):
        try:
            if not storage.is_dir(resolved):
                return f"{resolved} is not a folder this node can read"
            if not any(storage.exists(storage.join(resolved, f)) for f in ("config.json", "model_index.json", "tiny.json")):
                return f"{resolved} has no config.json or model_index.json"
        except OSError as e:
            return f"{resolved} cannot be read from this node ({e})"
        return None
    path = Path(resolved).expanduser()
    if path.is_absolute() or resolved.startswith((".", "~")):
        if not path.is_dir():
            return f"folder {resolved} does not exist on this node"
        if not any((path / f).exists() for f in ("config.json", "model_index.json", "tiny.json")):
            return f"folder {resolved} has no config.json or model_index.json"
        return None
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(resolved, "config.json")
        if not isinstance(cached, str):
            cached = try_to_load_from_cache(resolved, "model_index.json")
    except Exception as e:  # a malformed id
        return f"hub id {resolved}: {e}"
    if isinstance(cached, str):
        return None
    if offline:
        return f"hub id {resolved} is not in this node's Hugging Face cache and HF_HUB_OFFLINE is set"
    return None  # downloads on first use


def check_models_on_nodes(ray, models: dict[str, str]) -> dict[str, dict[str, Optional[str]]]:
    """Check from every alive node that each model (config key → resolved
    name) loads there. Returns {node: {key: problem or None}}."""
    from aesformer.storage import on_every_node

    def probe(models: dict[str, str]) -> dict[str, Optional[str]]:
        return {key: model_status(name) for key, name in models.items()}

    return on_every_node(ray, probe, models)


def require_models_on_nodes(ray, models: dict[str, str]) -> None:
    """Before anything loads: each model (config key → resolved name) loads
    on this node and, on a cluster of several nodes, on every node
    (:func:`check_models_on_nodes`). Raises ConfigError naming every node and
    model that is missing."""
    from aesformer.config import ConfigError

    report = {"driver": {key: model_status(name) for key, name in models.items()}}
    if len([n for n in ray.nodes() if n.get("Alive")]) > 1:
        report.update(check_models_on_nodes(ray, models))
    missing = [f"{node}: {key} ({problem})" for node, found in sorted(report.items())
               for key, problem in found.items() if problem]
    if missing:
        raise ConfigError("models missing on the cluster's nodes: " + "; ".join(missing)
                                 + ". Put them on a folder every node mounts, use a hub id, or copy them to each node")

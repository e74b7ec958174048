"""One interface over the VLM inference engines, chosen by config.

``make_engine("hf", path)`` runs transformers on CPU (or one GPU);
``make_engine("vllm", path, tensor_parallel_size=2)`` runs vLLM on GPU. Both
answer the same three calls:

- ``generate(requests, sampling) -> list[list[Completion]]``: for each
  request, ``sampling.n`` completions with their token ids, the log-prob of
  each sampled token and the decoded text;
- ``score_tokens(requests, token_ids) -> Tensor [B, K]``: log-probs of the
  given candidate tokens at the first generated position (a judge's reading
  of the digits "0".."5", or of "yes"/"no");
- ``update_weights(meta, buffer)``: load new weights in place from the
  wire format of :func:`pack_weights` (tests, one-off loads).

Rollout engines in RL receive new weights over a collective instead
(``aesformer.weight_sync``), in vLLM's four steps:
``init_weight_transfer(init_info)`` joins the transfer group,
``start_weight_update()``, ``receive_weights(update_info)`` and
``finish_weight_update()``. After every update an engine drops whatever it
cached under the old weights: vLLM's prefix cache is reset
(``LLM.reset_prefix_cache``); the transformers engine keeps no cache between
calls.

A request is a dict: ``{"images": [PIL.Image, ...], "text": str}`` (one user
turn: the images, then the text), or ``{"messages": [...]}`` in the chat
format (image parts ``{"type": "image"}`` take their image from an
``"image"`` key on the part, or in order from ``"images"``).

Log-probs returned by ``generate`` are those of the sampling distribution at
the request's temperature before top-p truncation, i.e.
``log_softmax(logits / temperature)``: the learner recomputes exactly this
(:func:`sequence_logprobs`), so the two can be compared token by token. (On
vLLM this is ``logprobs_mode="processed_logprobs"``, which equals it when
top_p is 1.0, the training default.) The vision placeholder tokens are
masked out of that distribution on every engine and in the learner
(:func:`banned_token_ids`): a response holding one would be read as a slot
for image features.

The same prompt construction (:func:`prompt_text`, :func:`request_images`)
feeds every engine and the learner, so the learner scores exactly the tokens
the engine saw. vLLM is imported lazily, only by :class:`VLLMEngine`; every
vLLM name the adapter uses is listed in :data:`VLLM_API` (a test checks them
against the installed vLLM).

Weights cross process boundaries as raw bytes plus a JSON-able list of
(name, dtype, shape, offset) records (:func:`pack_weights`), never as pickle.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

log = logging.getLogger(__name__)

ENGINE_KINDS = ("hf", "vllm")


# -- requests and results ------------------------------------------------------------

@dataclass
class SamplingSettings:
    """How to sample: ``n`` completions per request, temperature, nucleus
    ``top_p``, at most ``max_tokens`` new tokens, and an optional seed (same
    seed, same request → same completions on the same engine)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: Optional[int] = None

    @classmethod
    def of(cls, value: Union["SamplingSettings", Mapping[str, Any], None]) -> "SamplingSettings":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown sampling setting(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return cls(**dict(value))


@dataclass
class Completion:
    """One sampled continuation. ``token_ids`` include the end-of-turn token
    when the model stopped by itself (``finish_reason == "stop"``);
    ``logprobs[i]`` is the log-prob of ``token_ids[i]``."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str = "stop"  # "stop" | "length"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


Request = Mapping[str, Any]


def request_messages(request: Request) -> list[dict]:
    """The chat messages of a request (see the module docstring)."""
    if "messages" in request:
        return list(request["messages"])
    if "text" not in request:
        raise ValueError(f"a request needs 'text' or 'messages', got keys {sorted(request)}")
    parts: list[dict] = [{"type": "image"} for _ in request.get("images") or ()]
    parts.append({"type": "text", "text": str(request["text"])})
    return [{"role": "user", "content": parts}]


def request_images(request: Request) -> list:
    """The request's images in prompt order (explicit ``images`` first, then
    any ``image`` set on message parts)."""
    images = list(request.get("images") or ())
    if "messages" in request:
        for message in request["messages"]:
            content = message.get("content")
            if isinstance(content, list):
                images.extend(p["image"] for p in content if isinstance(p, dict) and p.get("image") is not None)
    return images


def prepare_image(image: Any, max_pixels: Optional[int] = None):
    """RGB PIL image, downscaled (aspect kept) to at most ``max_pixels``:
    the same resize SFT trains with."""
    from PIL import Image

    from aesformer.sft import cap_pixels

    if not isinstance(image, Image.Image):
        raise TypeError(f"request images must be PIL images, got {type(image).__name__}")
    return cap_pixels(image.convert("RGB"), max_pixels)


def encode_prompt(processor: Any, request: Request, max_pixels: Optional[int] = None) -> dict:
    """The processor's tensors for one request's prompt (one row): its
    templated text and its images capped to ``max_pixels``."""
    images = [prepare_image(im, max_pixels) for im in request_images(request)]
    return dict(processor(text=[prompt_text(processor, request)], images=images or None, return_tensors="pt"))


def prompt_text(processor: Any, request: Request) -> str:
    """The chat-templated prompt, ending with the assistant's turn opening."""
    messages = [_strip_image_objects(m) for m in request_messages(request)]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _strip_image_objects(message: dict) -> dict:
    # Templates only need the part types; keep PIL objects out of Jinja.
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = [{k: v for k, v in p.items() if k != "image"} if isinstance(p, dict) else p for p in content]
    return {**message, "content": parts}


# -- weights on the wire ---------------------------------------------------------------

def pack_weights(named_tensors: Iterable[tuple[str, Any]]) -> tuple[list[dict], bytes]:
    """Tensors → (meta, buffer): ``meta`` is a JSON-able list of
    ``{"name", "dtype", "shape", "offset", "nbytes"}``, ``buffer`` the raw
    bytes of every tensor back to back (CPU, contiguous). No pickle."""
    import torch

    meta: list[dict] = []
    chunks: list[bytes] = []
    offset = 0
    for name, tensor in named_tensors:
        t = tensor.detach().to("cpu").contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        meta.append({"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                     "offset": offset, "nbytes": len(raw)})
        chunks.append(raw)
        offset += len(raw)
    return meta, b"".join(chunks)


def unpack_weights(meta: Sequence[Mapping[str, Any]], buffer: Union[bytes, bytearray, memoryview], device: Any = "cpu"
                   ) -> list[tuple[str, Any]]:
    """Inverse of :func:`pack_weights`: [(name, tensor)] on ``device``."""
    import torch

    if isinstance(meta, (str, bytes)):
        meta = json.loads(meta)
    view = memoryview(buffer)
    out = []
    for rec in meta:
        dtype = getattr(torch, rec["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"weight '{rec['name']}' has an unknown dtype '{rec['dtype']}'")
        start, n = int(rec["offset"]), int(rec["nbytes"])
        if start + n > len(view):
            raise ValueError(f"weight '{rec['name']}' runs past the end of the buffer ({start + n} > {len(view)} bytes)")
        raw = torch.frombuffer(bytearray(view[start:start + n]), dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
        t = raw.view(dtype).reshape(rec["shape"])
        out.append((rec["name"], t.to(device)))
    return out


# -- the learner's side: log-probs of given responses ---------------------------------------

def policy_inputs(processor: Any, requests: Sequence[Request], responses: Sequence[Sequence[int]],
                  max_pixels: Optional[int] = None) -> dict:
    """Model inputs for prompt + response sequences, right-padded.

    Returns the processor's tensors for the full sequences (``input_ids``,
    ``attention_mask``, vision tensors) plus ``response_ids`` [B, R] (0 on
    padding), ``response_mask`` [B, R] and ``response_start`` [B] (index of
    the first response token in each row).
    """
    import torch

    if len(requests) != len(responses):
        raise ValueError(f"{len(requests)} requests but {len(responses)} responses")
    rows: list[dict] = []
    for req, resp in zip(requests, responses):
        rows.append({"enc": encode_prompt(processor, req, max_pixels), "resp": [int(t) for t in resp]})
    seq_keys = [k for k, v in rows[0]["enc"].items()
                if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == rows[0]["enc"]["input_ids"].shape]
    length = max(r["enc"]["input_ids"].shape[1] + len(r["resp"]) for r in rows)
    max_resp = max(1, max(len(r["resp"]) for r in rows))
    pad_id = _pad_id(processor)
    batch: dict[str, list] = {k: [] for k in seq_keys}
    other: dict[str, list] = {}
    response_ids = torch.zeros(len(rows), max_resp, dtype=torch.long)
    response_mask = torch.zeros(len(rows), max_resp, dtype=torch.float32)
    starts = []
    for i, r in enumerate(rows):
        enc, resp = r["enc"], torch.tensor(r["resp"], dtype=torch.long)
        p = enc["input_ids"].shape[1]
        pad = length - p - len(resp)
        for k in seq_keys:
            v = enc[k][0]
            if k == "input_ids":
                tail = torch.cat([resp, torch.full((pad,), pad_id, dtype=v.dtype)])
            elif k == "attention_mask":
                tail = torch.cat([torch.ones(len(resp), dtype=v.dtype), torch.zeros(pad, dtype=v.dtype)])
            else:  # token-type ids and the like: text tokens are 0
                tail = torch.zeros(len(resp) + pad, dtype=v.dtype)
            batch[k].append(torch.cat([v, tail]))
        for k, v in enc.items():
            if k not in seq_keys and isinstance(v, torch.Tensor):
                other.setdefault(k, []).append(v)
        response_ids[i, :len(resp)] = resp
        response_mask[i, :len(resp)] = 1.0
        starts.append(p)
    out = {k: torch.stack(v) for k, v in batch.items()}
    out.update({k: torch.cat(v) for k, v in other.items()})
    out["response_ids"] = response_ids
    out["response_mask"] = response_mask
    out["response_start"] = torch.tensor(starts, dtype=torch.long)
    return out


RESPONSE_KEYS = ("response_ids", "response_mask", "response_start")


def sequence_logprobs(model: Any, inputs: Mapping[str, Any], temperature: float = 1.0, with_entropy: bool = False,
                      banned_ids: Optional[Sequence[int]] = None):
    """Log-probs [B, R] of ``response_ids`` under ``model`` at ``temperature``
    (and the per-position entropy [B, R] when asked), from one forward pass
    over :func:`policy_inputs`. ``banned_ids`` (see :func:`banned_token_ids`)
    are masked out of the distribution, as the engines sample. Padding
    positions hold 0; mask them with ``response_mask``. Differentiable when
    called with grad enabled."""
    import torch

    from aesformer.grpo import entropy_from_logits, token_logprobs

    model_inputs = {k: v for k, v in inputs.items() if k not in RESPONSE_KEYS}
    device = next(model.parameters()).device
    model_inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in model_inputs.items()}
    logits = model(**model_inputs, use_cache=False).logits
    resp = inputs["response_ids"].to(device)
    mask = inputs["response_mask"].to(device)
    # the logit at position t predicts token t+1
    index = (inputs["response_start"].to(device).unsqueeze(1) - 1 + torch.arange(resp.shape[1], device=device))
    index = index.clamp(max=logits.shape[1] - 1)
    picked = logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).float()
    if temperature != 1.0:
        picked = picked / temperature
    picked = mask_logits(picked, banned_ids)
    labels = torch.where(mask > 0, resp, torch.full_like(resp, -100))
    logp = token_logprobs(picked, labels) * mask
    if not with_entropy:
        return logp
    with torch.no_grad():  # a metric: no gradient, and no [B, R, V] kept alive for backward
        entropy = entropy_from_logits(picked)
    return logp, entropy * mask


def prompt_key(processor: Any, request: Request) -> tuple:
    """What makes two requests the same prompt: the templated text and the
    very same image objects (a group's samples share them)."""
    return prompt_text(processor, request), tuple(id(im) for im in request_images(request))


def response_logprobs(model: Any, processor: Any, requests: Sequence[Request], responses: Sequence[Sequence[int]],
                      temperature: float = 1.0, *, banned_ids: Optional[Sequence[int]] = None,
                      max_pixels: Optional[int] = None, with_entropy: bool = False,
                      max_batch: Optional[int] = None, fixed_passes: bool = False):
    """What :func:`sequence_logprobs` gives over :func:`policy_inputs`, but
    each distinct prompt runs once and the responses continue it
    (``aesformer.continuations``): returns log-probs [B, R], the entropy
    [B, R] (None unless asked) and the response mask [B, R]. Differentiable
    when called with grad enabled.

    Responses are batched by length (at most ``max_batch`` per batch), each
    batch one pass over its distinct prompts and one over the responses.
    ``fixed_passes``: the whole call is exactly those two passes, whatever
    the rows (ZeRO-3 ranks must run the same number of forward passes)."""
    import torch

    from aesformer.continuations import continue_pass, length_buckets, prompt_groups, prompt_pass
    from aesformer.grpo import entropy_from_logits, token_logprobs

    if len(requests) != len(responses):
        raise ValueError(f"{len(requests)} requests but {len(responses)} responses")
    width = max([1] + [len(r) for r in responses])
    pad_id = _pad_id(processor)
    groups = prompt_groups([prompt_key(processor, r) for r in requests])
    prompt_of = {i: g for g, members in enumerate(groups) for i in members}
    encoded: dict[int, dict] = {}

    def encode(g: int) -> dict:
        if g not in encoded:
            encoded[g] = encode_prompt(processor, requests[groups[g][0]], max_pixels)
        return encoded[g]

    if fixed_passes:
        batches = [list(range(len(requests)))]
    else:  # a prompt's responses together where lengths allow, so the prompt runs once
        batches = [[i for b in bucket for i in groups[b]] for bucket in
                   length_buckets([max(len(responses[i]) for i in g) for g in groups], max_batch=1 << 30)]
        batches = [batch[k:k + (max_batch or len(batch))] for batch in batches
                   for k in range(0, len(batch), max_batch or len(batch))]
    rows_logp: dict[int, Any] = {}
    rows_entropy: dict[int, Any] = {}
    for batch in batches:
        prompts = list(dict.fromkeys(prompt_of[i] for i in batch))
        state = prompt_pass(model, left_padded([encode(g) for g in prompts], pad_id))
        rows = [prompts.index(prompt_of[i]) for i in batch]
        longest = max(1, max(len(responses[i]) for i in batch))
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.float32)
        for j, i in enumerate(batch):
            ids[j, :len(responses[i])] = torch.tensor([int(t) for t in responses[i]], dtype=torch.long)
            mask[j, :len(responses[i])] = 1.0
        # the prompt's last logit predicts response token 0; token t's logit predicts t+1
        first = state.last_logits[torch.tensor(rows, device=state.last_logits.device)].unsqueeze(1)
        if longest > 1 or fixed_passes:
            logits, _ = continue_pass(model, state, rows, ids[:, :max(1, longest - 1)], mask[:, :max(1, longest - 1)])
            picked = torch.cat([first, logits[:, :longest - 1]], dim=1).float()
        else:
            picked = first.float()
        if temperature != 1.0:
            picked = picked / temperature
        picked = mask_logits(picked, banned_ids)
        mask = mask.to(picked.device)
        labels = torch.where(mask > 0, ids.to(picked.device), torch.full_like(ids, -100, device=picked.device))
        logp = token_logprobs(picked, labels) * mask
        if with_entropy:
            with torch.no_grad():  # a metric: no gradient, and no [B, R, V] kept alive for backward
                entropy = entropy_from_logits(picked) * mask
        for j, i in enumerate(batch):
            rows_logp[i] = logp[j]
            if with_entropy:
                rows_entropy[i] = entropy[j]
    device = next(iter(rows_logp.values())).device if rows_logp else "cpu"

    def stacked(rows: dict) -> Any:
        return torch.stack([torch.nn.functional.pad(rows[i], (0, width - rows[i].shape[0])) for i in range(len(requests))])

    out_mask = torch.zeros(len(requests), width, dtype=torch.float32, device=device)
    for i, r in enumerate(responses):
        out_mask[i, :len(r)] = 1.0
    return stacked(rows_logp), (stacked(rows_entropy) if with_entropy else None), out_mask


def _pad_id(processor: Any) -> int:
    tok = getattr(processor, "tokenizer", processor)
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return int(pid if pid is not None else 0)


def eos_token_ids(model: Any, processor: Any) -> list[int]:
    """The ids that end an assistant turn (generation config, else tokenizer)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = getattr(getattr(processor, "tokenizer", processor), "eos_token_id", None)
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


# Placeholder tokens of the vision inputs. A response must never contain one:
# a forward pass would read it as a slot for image features. Every engine
# masks them out of the sampling distribution, and the learner's log-probs
# use the same masked distribution.
VISION_PLACEHOLDERS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
MASKED_LOGIT = -1e9


def banned_token_ids(processor: Any) -> list[int]:
    """Ids of the vision placeholder tokens the policy may not generate."""
    tok = getattr(processor, "tokenizer", processor)
    names = set(VISION_PLACEHOLDERS)
    for attr in ("image_token", "video_token"):
        if isinstance(getattr(processor, attr, None), str):
            names.add(getattr(processor, attr))
    vocab = tok.get_vocab()
    return sorted(vocab[n] for n in names if n in vocab)


def mask_logits(logits: Any, banned: Optional[Sequence[int]]) -> Any:
    if banned:
        logits = logits.clone()
        logits[..., list(banned)] = MASKED_LOGIT
    return logits


def _is_sequence(key: str, value: Any, enc: Mapping[str, Any]) -> bool:
    """Whether a processor output runs along the tokens (ids, mask, token types)."""
    ids = enc["input_ids"]
    return hasattr(value, "dim") and value.dim() == 2 and tuple(value.shape) == tuple(ids.shape)


def left_padded(encs: Sequence[Mapping[str, Any]], pad_id: int, length: Optional[int] = None) -> dict:
    """One batch from single-row processor outputs (each cut to its first
    ``length`` tokens when given), left-padded so that every row ends at the
    last column; vision tensors are concatenated in row order."""
    import torch

    rows = [{k: (v[:, :length] if length and _is_sequence(k, v, e) else v) for k, v in e.items()} for e in encs]
    longest = max(r["input_ids"].shape[1] for r in rows)
    out: dict[str, list] = {}
    for r in rows:
        pad = longest - r["input_ids"].shape[1]
        for k, v in r.items():
            if not isinstance(v, torch.Tensor):
                continue
            if _is_sequence(k, v, r):
                fill = pad_id if k == "input_ids" else 0
                v = torch.cat([torch.full((1, pad), fill, dtype=v.dtype), v], dim=1)
            out.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in out.items()}


def _top_p(probs: Any, top_p: float) -> Any:
    """The nucleus of ``probs`` [B, V]: the most likely tokens whose mass
    first reaches ``top_p`` (at least one), renormalised."""
    import torch

    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
    sorted_probs = sorted_probs.masked_fill(before > top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


# an opening shorter than this is not worth a pass of its own
MIN_SHARED_OPENING = 16


def _shared_openings(encs: Sequence[Mapping[str, Any]], image_keys: Sequence[tuple]) -> list[tuple[list[int], int]]:
    """Consecutive encoded requests grouped by a common opening: the same
    images and the same first tokens, with every image token inside the
    opening and at least one token of each request after it. Returns
    (indices, opening length) per group; a lone request is a group of one."""
    def vision_end(enc) -> int:
        types = enc.get("mm_token_type_ids")
        if types is None:
            return 0
        nonzero = (types[0] != 0).nonzero()
        return int(nonzero.max()) + 1 if len(nonzero) else 0

    def common(a, b) -> int:
        n = min(len(a), len(b))
        diff = (a[:n] != b[:n]).nonzero()
        return int(diff[0]) if len(diff) else n

    groups: list[tuple[list[int], int]] = []
    for i, enc in enumerate(encs):
        ids = enc["input_ids"][0]
        if groups:
            members, shared = groups[-1]
            first = encs[members[0]]["input_ids"][0]
            q = min(common(first, ids), len(ids) - 1, shared)
            floor = max(MIN_SHARED_OPENING, vision_end(encs[members[0]]))
            # join while the opening stays long: a group's plans share instructions, photo and reference
            alone = len(members) == 1  # its opening is not set yet: the whole request
            if image_keys[i] == image_keys[members[0]] and q >= floor and (alone or q >= shared - max(8, shared // 10)):
                groups[-1] = (members + [i], q)
                continue
        groups.append(([i], len(ids) - 1))
    return groups


# -- transformers engine ----------------------------------------------------------------

class HFEngine:
    """transformers ``generate`` and forward passes; CPU by default.

    ``model``/``processor`` may be passed in to share an already loaded model
    (the learner's checks do); otherwise they are loaded from ``model_path``.
    """

    kind = "hf"

    def __init__(self, model_path: str, *, dtype: str = "float32", device: str = "cpu",
                 max_pixels: Optional[int] = None, batch_size: int = 64, model: Any = None, processor: Any = None):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

        from aesformer.storage import local_copy

        self.model_path = local_copy(model_path) if model is None or processor is None else str(model_path)
        self.device = torch.device(device)
        self.max_pixels = max_pixels
        self.batch_size = max(1, int(batch_size))
        self._params: Optional[dict] = None
        self._receiver = None
        if processor is None:
            processor = AutoProcessor.from_pretrained(self.model_path)
        if model is None:
            model = AutoModelForImageTextToText.from_pretrained(self.model_path, dtype=getattr(torch, dtype))
        self.processor = processor
        self.model = model.to(self.device).eval()
        self.eos_ids = eos_token_ids(self.model, processor)
        self.pad_id = _pad_id(processor)
        self.banned_ids = banned_token_ids(processor)
        # Sample from exactly the settings we pass: drop the checkpoint's
        # sampling defaults (top_k, repetition penalty, ...) but keep its ids.
        self.model.generation_config = GenerationConfig(
            eos_token_id=self.eos_ids or None, pad_token_id=self.pad_id,
            bos_token_id=getattr(self.model.generation_config, "bos_token_id", None))

    # -- prompts: each request encoded on its own, batches built from those ---------------
    def _encode_one(self, request: Request) -> dict:
        return encode_prompt(self.processor, request, self.max_pixels)

    def _left_padded(self, encs: Sequence[dict], length: Optional[int] = None) -> dict:
        return {k: v.to(self.device) for k, v in left_padded(encs, self.pad_id, length).items()}

    def generate(self, requests: Sequence[Request], sampling: Any = None) -> list[list[Completion]]:
        """Each prompt runs once; its ``n`` samples, and those of the other
        prompts of a length bucket, decode together as one batch."""
        import torch

        from aesformer.continuations import length_buckets

        s = SamplingSettings.of(sampling)
        out: list[Optional[list[Completion]]] = [None] * len(requests)
        rng = torch.random.fork_rng(devices=[]) if s.seed is not None else contextlib.nullcontext()
        with rng, torch.no_grad():
            if s.seed is not None:
                torch.manual_seed(s.seed)
            encs = [self._encode_one(r) for r in requests]
            for bucket in length_buckets([e["input_ids"].shape[1] for e in encs], max_batch=self.batch_size):
                for i, group in zip(bucket, self._sample(self._left_padded([encs[i] for i in bucket]), s)):
                    out[i] = group
        return out  # type: ignore[return-value]

    def _sample(self, enc: dict, s: SamplingSettings) -> list[list[Completion]]:
        import torch

        from aesformer.continuations import continue_pass, prompt_pass, select_cache

        state = prompt_pass(self.model, enc)
        prompts = enc["input_ids"].shape[0]
        rows = torch.arange(prompts).repeat_interleave(s.n)  # sample j of prompt i is row i*n + j
        cache = select_cache(self.model, state.cache, rows)
        last = state.last_logits[rows.to(state.last_logits.device)]
        greedy = s.temperature <= 1e-5
        eos = torch.tensor(self.eos_ids or [-1], device=last.device)
        finished = torch.zeros(len(rows), dtype=torch.bool, device=last.device)
        tokens, logps = [], []
        for t in range(s.max_tokens):
            logits = last.float() if greedy else last.float() / s.temperature
            logits = mask_logits(logits, self.banned_ids)
            logp_all = torch.log_softmax(logits, dim=-1)
            if greedy:
                token = logits.argmax(dim=-1)
            else:
                token = torch.multinomial(_top_p(logp_all.exp(), s.top_p), 1).squeeze(1)
            token = torch.where(finished, torch.full_like(token, self.pad_id), token)
            tokens.append(token)
            logps.append(logp_all.gather(1, token.unsqueeze(1)).squeeze(1))
            finished |= torch.isin(token, eos)
            if bool(finished.all()) or t == s.max_tokens - 1:
                break
            logits, cache = continue_pass(self.model, state, rows, token.unsqueeze(1),
                                          torch.ones(len(rows), 1), cache=cache, start=t, logits_to_keep=1)
            last = logits[:, -1]
        seqs = torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in range(len(rows))]
        lps = torch.stack(logps, dim=1).tolist() if logps else [[] for _ in range(len(rows))]
        eos_set = set(self.eos_ids)
        results: list[list[Completion]] = []
        for i in range(prompts):
            group = []
            for j in range(s.n):
                ids, lp = seqs[i * s.n + j], lps[i * s.n + j]
                cut = next((k + 1 for k, tok in enumerate(ids) if tok in eos_set), None)
                reason = "stop" if cut is not None else "length"
                cut = len(ids) if cut is None else cut
                text = self.processor.tokenizer.decode(ids[:cut], skip_special_tokens=True)
                group.append(Completion(ids[:cut], [float(x) for x in lp[:cut]], text, reason))
            results.append(group)
        return results

    def score_tokens(self, requests: Sequence[Request], token_ids: Sequence[int]) -> Any:
        """[B, K] log-probs (over the full vocabulary) of ``token_ids`` as the
        first generated token. Consecutive requests that open with the same
        tokens and images (a judge's instructions and photo, then each plan)
        run that opening once and their tails as a batch; the others run in
        length buckets."""
        import torch

        from aesformer.continuations import continue_pass, length_buckets, prompt_pass

        ids = torch.tensor([int(t) for t in token_ids], dtype=torch.long)
        encs = [self._encode_one(r) for r in requests]
        last: dict[int, Any] = {}
        singles: list[int] = []
        with torch.no_grad():
            for group, shared in _shared_openings(encs, [tuple(id(im) for im in request_images(r)) for r in requests]):
                if len(group) == 1:
                    singles.extend(group)
                    continue
                state = prompt_pass(self.model, self._left_padded([encs[group[0]]], shared))
                tails = [encs[i]["input_ids"][0, shared:] for i in group]  # each member's own tokens
                for batch in length_buckets([len(t) for t in tails], max_batch=self.batch_size):
                    width = max(len(tails[b]) for b in batch)
                    tokens = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                    mask = torch.zeros(len(batch), width)
                    for j, b in enumerate(batch):
                        tokens[j, :len(tails[b])] = tails[b]
                        mask[j, :len(tails[b])] = 1.0
                    ends = sorted({len(tails[b]) - 1 for b in batch})  # each row's last real position
                    logits, _ = continue_pass(self.model, state, [0] * len(batch), tokens, mask,
                                              logits_to_keep=torch.tensor(ends))
                    for j, b in enumerate(batch):
                        last[group[b]] = logits[j, ends.index(len(tails[b]) - 1)]
            lengths = [encs[i]["input_ids"].shape[1] for i in singles]
            for bucket in length_buckets(lengths, max_batch=self.batch_size):
                members = [singles[b] for b in bucket]
                state = prompt_pass(self.model, self._left_padded([encs[i] for i in members]))
                for j, i in enumerate(members):
                    last[i] = state.last_logits[j]
        if not requests:
            return torch.zeros(0, len(ids))
        logits = torch.stack([last[i] for i in range(len(requests))]).float()
        return torch.log_softmax(logits, dim=-1)[:, ids.to(logits.device)].cpu()

    def update_weights(self, meta: Sequence[Mapping[str, Any]], buffer: Union[bytes, memoryview]) -> int:
        """Load packed weights (names as in the HF checkpoint) in place;
        returns how many tensors were loaded. Unknown names are an error."""
        return self.load_weights(unpack_weights(meta, buffer))

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> int:
        """Copy ``(name, tensor)`` pairs into the model's parameters in place."""
        import torch

        if self._params is None:
            self._params = dict(self.model.named_parameters())
            self._params.update(dict(self.model.named_buffers()))
        loaded = 0
        with torch.no_grad():
            for name, tensor in weights:
                target = self._params.get(name)
                if target is None:
                    raise KeyError(f"update_weights: the model has no parameter '{name}'")
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(f"update_weights: '{name}' has shape {tuple(tensor.shape)}, the model {tuple(target.shape)}")
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))
                loaded += 1
        return loaded

    # weight transfer over a gloo group (aesformer.weight_sync); no cache to drop afterwards
    def init_weight_transfer(self, init_info: dict) -> None:
        from aesformer.weight_sync import GlooReceiver

        if self._receiver is None:
            self._receiver = GlooReceiver(self.load_weights)
        self._receiver.init_transfer_engine(init_info)

    def start_weight_update(self) -> None:
        self._require_receiver().start_weight_update()

    def receive_weights(self, update_info: dict) -> int:
        return self._require_receiver().update_weights(update_info)

    def finish_weight_update(self) -> None:
        self._require_receiver().finish_weight_update()

    def _require_receiver(self):
        if self._receiver is None:
            raise RuntimeError("weight transfer not initialised: call init_weight_transfer first")
        return self._receiver

    def tokenizer(self):
        return self.processor.tokenizer

    def shutdown(self) -> None:
        if self._receiver is not None:
            self._receiver.shutdown()
        self.model = None


# -- vLLM engine ------------------------------------------------------------------------

# Every vLLM name the adapter uses: module → {attribute: [parameters or fields]}.
# tests/test_engines.py checks each one against the installed vLLM.
VLLM_API: dict[str, dict[str, list[str]]] = {
    "vllm": {
        "LLM": ["generate", "collective_rpc", "get_tokenizer", "reset_prefix_cache"],
        "SamplingParams": ["n", "temperature", "top_p", "max_tokens", "seed", "logprobs", "logprob_token_ids",
                           "detokenize", "skip_special_tokens", "logit_bias"],
        "EngineArgs": ["model", "tensor_parallel_size", "dtype", "gpu_memory_utilization", "max_model_len",
                       "limit_mm_per_prompt", "worker_extension_cls", "logprobs_mode",
                       "max_logprobs", "seed", "enable_prefix_caching", "enforce_eager", "generation_config",
                       "distributed_executor_backend", "weight_transfer_config"],
    },
    "vllm.config": {"WeightTransferConfig": ["backend"]},
    # the worker methods reached through LLM.collective_rpc, and the trainer side
    "vllm.v1.worker.gpu_worker": {"Worker": ["init_weight_transfer_engine", "start_weight_update", "update_weights",
                                             "finish_weight_update"]},
    "vllm.distributed.weight_transfer.base": {"WeightSource": ["metadata", "iter_full"],
                                              "ParamMeta": ["name", "dtype", "shape"]},
    "vllm.distributed.weight_transfer.factory": {"WeightTransferTrainerFactory": ["trainer_init"]},
    "vllm.distributed.weight_transfer.nccl_engine": {
        "NCCLTrainerInitInfo": ["master_address", "master_port", "world_size", "rank", "packed",
                                "packed_buffer_size_bytes"],
        "NCCLTrainerWeightTransferEngine": ["send_weights", "shutdown"]},
    "vllm.outputs": {
        "RequestOutput": ["outputs"],
        "CompletionOutput": ["token_ids", "logprobs", "text", "finish_reason"],
    },
    "vllm.logprobs": {"Logprob": ["logprob"]},
}


class VLLMWorkerExtension:
    """Methods added to every vLLM GPU worker (``worker_extension_cls``) and
    called through ``LLM.collective_rpc``: the documented way for an RL
    trainer to load new weights into a running engine. Each worker (one per
    tensor-parallel rank) receives the full tensors and the model's own
    ``load_weights`` shards them."""

    def aesformer_load_weights(self, meta: list, buffer: bytes) -> int:
        weights = unpack_weights(meta, buffer, device=self.device)
        self.model_runner.get_model().load_weights(weights=weights)
        return len(weights)

    def aesformer_weight_checksum(self, names: list) -> dict:
        """Sum of each named parameter (for tests of the weight update)."""
        params = dict(self.model_runner.get_model().named_parameters())
        return {n: float(params[n].float().sum()) for n in names if n in params}


class VLLMEngine:
    """vLLM on GPU: continuous batching, prefix caching, tensor parallel.

    Prompts are built with the same chat template as the HF engine (the
    processor of ``model_path``) and passed as text plus
    ``multi_modal_data``; vLLM's own processor turns them into tokens.
    """

    kind = "vllm"

    def __init__(self, model_path: str, *, tensor_parallel_size: int = 1, dtype: str = "bfloat16",
                 gpu_memory_utilization: float = 0.85, max_model_len: int = 4096, max_pixels: Optional[int] = None,
                 max_images: int = 1, enforce_eager: bool = False, enable_prefix_caching: bool = True,
                 seed: int = 0, batch_size: int = 0, **_: Any):
        from transformers import AutoProcessor
        from vllm import LLM

        from aesformer.storage import local_copy

        self.model_path = local_copy(model_path)  # a folder at a URI: this node's copy
        self.max_pixels = max_pixels
        self.processor = AutoProcessor.from_pretrained(self.model_path)
        self.banned_ids = banned_token_ids(self.processor)
        self.llm = LLM(
            model=self.model_path, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            # images arrive already downscaled to max_pixels (prepare_image), as on every engine;
            # no prompt holds a video, so no memory is reserved for one
            limit_mm_per_prompt={"image": max_images, "video": 0},
            # new weights arrive over NCCL from the learner (aesformer.weight_sync's protocol)
            weight_transfer_config={"backend": "nccl"},
            worker_extension_cls=f"{__name__}.VLLMWorkerExtension",
            # log-probs after temperature (see the module docstring)
            logprobs_mode="processed_logprobs", max_logprobs=32, seed=seed,
            enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager,
            # sample from exactly our settings, not the checkpoint's defaults
            generation_config="vllm",
            # tensor parallel inside this process's GPUs (a Ray actor holding them all)
            distributed_executor_backend="mp" if tensor_parallel_size > 1 else None,
        )

    def _prompts(self, requests: Sequence[Request]) -> list[dict]:
        prompts = []
        for req in requests:
            p: dict = {"prompt": prompt_text(self.processor, req)}
            images = [prepare_image(im, self.max_pixels) for im in request_images(req)]
            if images:
                p["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
            prompts.append(p)
        return prompts

    def generate(self, requests: Sequence[Request], sampling: Any = None) -> list[list[Completion]]:
        from vllm import SamplingParams

        s = SamplingSettings.of(sampling)

        def params(seed):
            return SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                                  seed=seed, logprobs=0, skip_special_tokens=True,
                                  # vLLM's strongest bias; the learner masks these ids the same way
                                  logit_bias={i: -100.0 for i in self.banned_ids} or None)

        # one seed per request: a shared seed would give every request the same random stream
        per_request = [params(None if s.seed is None else s.seed + i) for i in range(len(requests))]
        outputs = self.llm.generate(self._prompts(requests), per_request, use_tqdm=False)
        results = []
        for out in outputs:
            group = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [float(step[t].logprob) for step, t in zip(c.logprobs or [], ids)]
                group.append(Completion(ids, lps, c.text, "length" if c.finish_reason == "length" else "stop"))
            results.append(group)
        return results

    def score_tokens(self, requests: Sequence[Request], token_ids: Sequence[int]) -> Any:
        import torch
        from vllm import SamplingParams

        ids = [int(t) for t in token_ids]
        params = SamplingParams(max_tokens=1, temperature=1.0, top_p=1.0, logprob_token_ids=ids, detokenize=False)
        outputs = self.llm.generate(self._prompts(requests), params, use_tqdm=False)
        rows = []
        for out in outputs:
            first = out.outputs[0].logprobs[0]
            rows.append([float(first[t].logprob) if t in first else float("-inf") for t in ids])
        return torch.tensor(rows, dtype=torch.float32)

    def update_weights(self, meta: Sequence[Mapping[str, Any]], buffer: Union[bytes, memoryview]) -> int:
        counts = self.llm.collective_rpc("aesformer_load_weights", args=(list(meta), bytes(buffer)))
        self.llm.reset_prefix_cache()
        return int(counts[0]) if counts else 0

    # weight transfer: vLLM's NCCL engine in each worker, driven through collective_rpc
    def init_weight_transfer(self, init_info: dict) -> None:
        self.llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": dict(init_info)})

    def start_weight_update(self) -> None:
        self.llm.collective_rpc("start_weight_update")

    def receive_weights(self, update_info: dict) -> int:
        self.llm.collective_rpc("update_weights", kwargs={"update_info": dict(update_info)})
        return len(update_info.get("names") or [])

    def finish_weight_update(self) -> None:
        self.llm.collective_rpc("finish_weight_update")
        # cached prefixes hold KV computed with the old weights
        self.llm.reset_prefix_cache()

    def tokenizer(self):
        return self.llm.get_tokenizer()

    def shutdown(self) -> None:
        self.llm = None


def make_engine(kind: str, model_path: str, **options: Any):
    """An engine of ``kind`` ("hf" or "vllm") for the model at ``model_path``.

    Options: hf — dtype, device, max_pixels, batch_size; vllm —
    tensor_parallel_size, dtype, gpu_memory_utilization, max_model_len,
    max_pixels, max_images, enforce_eager, enable_prefix_caching, seed.
    """
    if kind == "hf":
        allowed = {"dtype", "device", "max_pixels", "batch_size", "model", "processor"}
        return HFEngine(model_path, **{k: v for k, v in options.items() if k in allowed and v is not None})
    if kind == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise RuntimeError("engine 'vllm' needs the vllm package (pip install 'aesformer[gpu]') and a CUDA GPU; "
                               "use engine=hf on CPU") from e
        return VLLMEngine(model_path, **{k: v for k, v in options.items() if v is not None})
    raise ValueError(f"unknown engine '{kind}'; choose one of {', '.join(ENGINE_KINDS)}")


def resolve_engine_kind(kind: str) -> str:
    """"auto" → vllm when CUDA and vllm are present, else hf."""
    if kind != "auto":
        return kind
    try:
        import torch

        if torch.cuda.is_available():
            import vllm  # noqa: F401

            return "vllm"
    except ImportError:
        pass
    return "hf"

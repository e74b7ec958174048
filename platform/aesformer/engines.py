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
        images = [prepare_image(im, max_pixels) for im in request_images(req)]
        enc = processor(text=[prompt_text(processor, req)], images=images or None, return_tensors="pt")
        rows.append({"enc": enc, "resp": [int(t) for t in resp]})
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

        self.model_path = str(model_path)
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

    # the prompts of a batch, left-padded so generation continues every row
    def _encode(self, requests: Sequence[Request]):
        texts, images = [], []
        for req in requests:
            texts.append(prompt_text(self.processor, req))
            images.extend(prepare_image(im, self.max_pixels) for im in request_images(req))
        enc = self.processor(text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    def generate(self, requests: Sequence[Request], sampling: Any = None) -> list[list[Completion]]:
        import torch

        s = SamplingSettings.of(sampling)
        out: list[list[Completion]] = []
        rng = torch.random.fork_rng(devices=[]) if s.seed is not None else contextlib.nullcontext()
        with rng, torch.no_grad():
            if s.seed is not None:
                torch.manual_seed(s.seed)
            for start in range(0, len(requests), self.batch_size):
                out.extend(self._generate_batch(requests[start:start + self.batch_size], s))
        return out

    def _generate_batch(self, requests: Sequence[Request], s: SamplingSettings) -> list[list[Completion]]:
        import torch

        enc = self._encode(requests)
        greedy = s.temperature <= 1e-5
        gen = self.model.generate(
            **enc, do_sample=not greedy, temperature=None if greedy else s.temperature,
            top_p=None if greedy or s.top_p >= 1.0 else s.top_p, top_k=None,
            max_new_tokens=s.max_tokens, num_return_sequences=s.n, suppress_tokens=self.banned_ids or None,
            output_logits=True, return_dict_in_generate=True)
        prompt_len = enc["input_ids"].shape[1]
        seqs = gen.sequences[:, prompt_len:]
        if gen.logits:
            logits = torch.stack(gen.logits, dim=1).float()  # [B*n, T, V] raw model logits
            if not greedy:
                logits = logits / s.temperature
            logits = mask_logits(logits, self.banned_ids)
            logp = torch.log_softmax(logits, dim=-1).gather(-1, seqs[:, :logits.shape[1]].unsqueeze(-1)).squeeze(-1)
        else:
            logp = torch.zeros(seqs.shape, dtype=torch.float32)
        results: list[list[Completion]] = []
        eos = set(self.eos_ids)
        for i in range(len(requests)):
            group = []
            for j in range(s.n):
                row = i * s.n + j
                ids = seqs[row].tolist()
                cut, reason = len(ids), "length"
                for k, t in enumerate(ids):
                    if t in eos:
                        cut, reason = k + 1, "stop"
                        break
                ids = ids[:cut]
                text = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
                group.append(Completion(ids, [float(x) for x in logp[row, :cut].tolist()], text, reason))
            results.append(group)
        return results

    def score_tokens(self, requests: Sequence[Request], token_ids: Sequence[int]) -> Any:
        """[B, K] log-probs (over the full vocabulary) of ``token_ids`` as the
        first generated token, from one batched forward pass."""
        import torch

        ids = torch.tensor([int(t) for t in token_ids], dtype=torch.long)
        rows = []
        with torch.no_grad():
            for start in range(0, len(requests), self.batch_size):
                enc = self._encode(requests[start:start + self.batch_size])
                logits = self.model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1, :].float()
                rows.append(torch.log_softmax(logits, dim=-1)[:, ids.to(logits.device)].cpu())
        return torch.cat(rows) if rows else torch.zeros(0, len(ids))

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

        self.model_path = str(model_path)
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

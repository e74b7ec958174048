"""The serving application's formats, as plain functions: its settings,
image validation, the plan by dimension, and the OpenAI wire formats
(chat completions, models, image edits).

The Ray Serve deployments that use them live in ``aesformer.actors.serve_app``;
``jobs/serve.py`` starts the application. Nothing here imports Ray.

Images arrive as uploaded bytes or as base64 ``data:`` URLs; they are checked
before anything is decoded: the content type, the byte limit, the pixel
count read from the header (a decompression bomb never gets decoded), and a
zero size. A URL is refused, never fetched. EXIF orientation is applied, so
the models see the photo the way a viewer shows it.
"""
from __future__ import annotations

import base64
import binascii
import io
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from aesformer.config import JobConfig

# -- settings ------------------------------------------------------------------------


@dataclass
class Autoscaling:
    """Ray Serve autoscaling of one deployment (replicas follow the
    ongoing requests per replica towards ``target_ongoing_requests``)."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    metrics_interval_s: float = 10.0
    look_back_period_s: float = 30.0


@dataclass
class DeploymentSettings:
    """Resources and queueing of one deployment."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 8      # per replica; the rest wait in the caller's queue
    max_queued_requests: int = 64      # per caller; beyond it a request is refused (503)
    autoscaling: Autoscaling = field(default_factory=Autoscaling)


@dataclass
class HttpSettings:
    host: str = "127.0.0.1"            # anything else must be set on purpose
    port: int = 8000
    # the environment variable holding the bearer token the API asks for; unset
    # or empty: no token is needed
    api_key_env: Optional[str] = None
    request_timeout_s: float = 300.0   # past it a request gets 504; the replica goes on
    retry_after_s: int = 1             # the Retry-After of a 503 (queue full)
    max_image_bytes: int = 20 << 20
    max_image_pixels: int = 40_000_000  # checked from the header, before decoding
    max_side: int = 8192                # a requested output side (width/height)
    model_pixels: int = 16_000_000      # larger photos are downscaled before the models see them


@dataclass
class ThinkerServing:
    engine: str = "auto"               # hf | vllm | auto
    dtype: str = "bfloat16"
    tensor_parallel: int = 1
    max_pixels: Optional[int] = 1_048_576
    max_tokens: int = 1024             # of a plan
    max_tokens_limit: int = 4096       # the most a chat request may ask for
    temperature: float = 0.6
    top_p: float = 0.95
    instruction: Optional[str] = None
    max_batch_size: int = 8            # @serve.batch
    batch_wait_timeout_s: float = 0.01  # what a request alone waits for company
    deployment: DeploymentSettings = field(default_factory=lambda: DeploymentSettings(num_gpus=1.0,
                                                                                      max_ongoing_requests=16))


@dataclass
class EditorServing:
    dtype: str = "bfloat16"
    steps: int = 40
    max_steps: int = 200
    true_cfg_scale: float = 4.0
    negative_prompt: Optional[str] = " "
    control_area: int = 1024 * 1024
    condition_area: int = 384 * 384
    output_area: int = 1440 * 1088
    offload: bool = False
    deployment: DeploymentSettings = field(default_factory=lambda: DeploymentSettings(num_gpus=1.0,
                                                                                      max_ongoing_requests=2))


@dataclass
class ServeConfig(JobConfig):
    output: str = "runs/serve"
    app_name: str = "aesformer"
    model_name: str = "aesthinker"     # the id /v1/models reports
    # the models: a path or URI, else the profile's models.thinker / models.editor
    thinker: Optional[str] = None
    editor: Optional[str] = None
    lora: Optional[str] = None         # the AesEditor LoRA folder
    http: HttpSettings = field(default_factory=HttpSettings)
    ingress: DeploymentSettings = field(default_factory=lambda: DeploymentSettings(
        num_cpus=0.5, max_ongoing_requests=256, max_queued_requests=-1))
    think: ThinkerServing = field(default_factory=ThinkerServing)
    edit: EditorServing = field(default_factory=EditorServing)


def deployment_options(d: DeploymentSettings) -> dict:
    """Keyword arguments of ``Deployment.options`` for these settings."""
    a = d.autoscaling
    return dict(
        ray_actor_options={"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
        max_ongoing_requests=d.max_ongoing_requests, max_queued_requests=d.max_queued_requests,
        autoscaling_config=dict(min_replicas=a.min_replicas, max_replicas=a.max_replicas,
                                initial_replicas=a.min_replicas,
                                target_ongoing_requests=a.target_ongoing_requests,
                                upscale_delay_s=a.upscale_delay_s, downscale_delay_s=a.downscale_delay_s,
                                metrics_interval_s=a.metrics_interval_s, look_back_period_s=a.look_back_period_s))


def local_folder(uri: Optional[str], cache_dir: str) -> Optional[str]:
    """A model or LoRA named by a URI of a pyarrow filesystem (``s3://``,
    ``gs://``, ``hdfs://``) copied once into ``cache_dir`` on this node
    (:func:`aesformer.storage.local_copy`); a path or hub id as it is."""
    from pathlib import Path

    from aesformer import storage

    if not uri or not storage.is_uri(uri):
        return uri
    return storage.local_copy(uri, Path(cache_dir).expanduser() / "remote")


# -- errors --------------------------------------------------------------------------


class ApiError(Exception):
    """A request the API refuses: HTTP status, a message that names the
    problem, the OpenAI-style error type, and extra headers."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: Optional[dict] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.kind = int(status), message, kind
        self.headers, self.param = dict(headers or {}), param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def check_bearer(authorization: Optional[str], token: Optional[str]) -> None:
    """401 unless ``Authorization: Bearer <token>`` (no token set: anything passes)."""
    import hmac

    if not token:
        return
    given = (authorization or "").strip()
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise ApiError(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                       "invalid_api_key", {"WWW-Authenticate": "Bearer"})


# -- images --------------------------------------------------------------------------

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff")
GENERIC_TYPES = ("", "application/octet-stream")  # clients that do not say: judged by the bytes


def refuse_url(value: str, field_name: str) -> None:
    """A URL where an image belongs: refused, never fetched."""
    v = value.strip().lower()
    if v.startswith(("http://", "https://", "ftp://", "file://", "//")) or "://" in v[:16]:
        raise ApiError(400, f"'{field_name}' is a URL; this API never fetches URLs: upload the image "
                            "(multipart file or base64 data: URL)", param=field_name)


def check_content_type(content_type: Optional[str], field_name: str) -> None:
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype not in IMAGE_TYPES and ctype not in GENERIC_TYPES:
        raise ApiError(415, f"'{field_name}' has content type '{ctype}'; send an image "
                            f"({', '.join(IMAGE_TYPES)})", "unsupported_media_type", param=field_name)


def read_image(data: bytes, *, max_bytes: int, max_pixels: int, field_name: str = "image",
               content_type: Optional[str] = None):
    """Checked, decoded, upright RGB photo from uploaded bytes; raises
    :class:`ApiError` naming the problem. Returns (image, info) where info
    holds the size as uploaded and as decoded."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if content_type is not None:
        check_content_type(content_type, field_name)
    if not data:
        raise ApiError(400, f"'{field_name}' is empty (zero bytes)", param=field_name)
    if len(data) > max_bytes:
        raise ApiError(413, f"'{field_name}' is {len(data)} bytes, over the limit of {max_bytes} bytes",
                       "request_too_large", param=field_name)
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w <= 0 or h <= 0:
                raise ApiError(400, f"'{field_name}' has zero size ({w}x{h})", param=field_name)
            if w * h > max_pixels:
                raise ApiError(413, f"'{field_name}' is {w}x{h} = {w * h} pixels, over the limit of "
                                    f"{max_pixels} pixels (not decoded)", "request_too_large", param=field_name)
            im.load()
            upright = ImageOps.exif_transpose(im).convert("RGB")
    except ApiError:
        raise
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"'{field_name}' is a decompression bomb: {e}", "request_too_large",
                       param=field_name) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ApiError(400, f"'{field_name}' is not an image that decodes ({type(e).__name__}: {e})",
                       param=field_name) from None
    return upright, {"width": w, "height": h}


def fit_pixels(image, max_pixels: int):
    """The photo downscaled (aspect kept) to at most ``max_pixels``."""
    from PIL import Image

    if image.width * image.height <= max_pixels:
        return image
    s = (max_pixels / (image.width * image.height)) ** 0.5
    return image.resize((max(1, int(image.width * s)), max(1, int(image.height * s))), Image.Resampling.LANCZOS)


def decode_data_url(url: Any, *, max_bytes: int, max_pixels: int, field_name: str = "image_url"):
    """A base64 ``data:image/...`` URL → (upright RGB image, info); any other URL is refused."""
    if not isinstance(url, str) or not url.strip():
        raise ApiError(400, f"'{field_name}' must be a base64 data: URL", param=field_name)
    if not url.startswith("data:"):
        refuse_url(url, field_name)
        raise ApiError(400, f"'{field_name}' must be a base64 data: URL", param=field_name)
    head, _, payload = url.partition(",")
    if ";base64" not in head:
        raise ApiError(400, f"'{field_name}' data URL must be base64-encoded", param=field_name)
    if len(payload) > max_bytes * 4 // 3 + 8:
        raise ApiError(413, f"'{field_name}' is over the limit of {max_bytes} bytes", "request_too_large",
                       param=field_name)
    try:
        raw = base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"'{field_name}' is not valid base64 ({e})", param=field_name) from None
    return read_image(raw, max_bytes=max_bytes, max_pixels=max_pixels, field_name=field_name,
                      content_type=head[5:].split(";")[0] or None)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_b64(image_or_bytes) -> str:
    data = image_or_bytes if isinstance(image_or_bytes, (bytes, bytearray)) else png_bytes(image_or_bytes)
    return base64.b64encode(data).decode("ascii")


# -- request fields ------------------------------------------------------------------


def int_field(value: Any, name: str, lo: int, hi: int, default: Optional[int] = None) -> Optional[int]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    try:
        v = int(str(value).strip())
    except ValueError:
        raise ApiError(400, f"'{name}' must be an integer, got {str(value)[:40]!r}", param=name) from None
    if not lo <= v <= hi:
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {v}", param=name)
    return v


def parse_size(value: Optional[str], max_side: int) -> tuple[Optional[int], Optional[int]]:
    """OpenAI's ``size`` ("WxH" or "auto") → (width, height)."""
    if value is None or str(value).strip().lower() in ("", "auto"):
        return None, None
    w, sep, h = str(value).lower().partition("x")
    if not sep:
        raise ApiError(400, f"'size' must be WIDTHxHEIGHT or auto, got {value!r}", param="size")
    return int_field(w, "size", 16, max_side), int_field(h, "size", 16, max_side)


# -- the plan by dimension -----------------------------------------------------------


def plan_view(text: str) -> dict:
    """The plan as the API returns it: its text, whether it parses as the
    seven-dimension format, and the seven dimensions in order (each with the
    text the plan gives it, or None)."""
    from aesformer.actions import DIMENSIONS, extract_dimensions
    from aesformer.pipeline import normalise_plan

    canonical, parsed = normalise_plan(text or "")
    found = extract_dimensions(canonical)
    return {"text": canonical, "parsed": parsed,
            "dimensions": [{"index": d.index, "key": d.key, "tag": d.tag, "header": d.header,
                            "text": found[d.key]} for d in DIMENSIONS]}


def timings(t: dict) -> dict:
    return {k: round(float(v) * 1000.0, 2) for k, v in t.items()}


# -- OpenAI: chat completions --------------------------------------------------------


@dataclass
class ChatCall:
    """One chat request, ready for the engine: the engine request (images as
    PIL), sampling settings, and what the reply needs."""

    request: dict
    sampling: Any                     # aesformer.engines.SamplingSettings
    logprobs: bool = False
    top_logprobs: int = 0
    model: str = ""
    n_images: int = 0
    roles: list = field(default_factory=list)
    last_text: str = ""
    usage: bool = True                # count the prompt's tokens (a second pass of the processor)


def engine_messages(messages: Any, *, max_bytes: int, max_pixels: int) -> tuple[list[dict], int]:
    """OpenAI messages → engine messages (images as PIL), and the image count."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    out, n_images = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        content = m.get("content")
        if content is None or isinstance(content, str):
            out.append({"role": role, "content": content or ""})
            continue
        if not isinstance(content, list):
            raise ApiError(400, f"messages[{i}].content must be text or a list of parts", param="messages")
        parts = []
        for j, p in enumerate(content):
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(p.get("text", ""))})
            elif kind == "image_url":
                url = p.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                image, _ = decode_data_url(url, max_bytes=max_bytes, max_pixels=max_pixels,
                                           field_name=f"messages[{i}].content[{j}].image_url")
                parts.append({"type": "image", "image": image})
                n_images += 1
            else:
                raise ApiError(400, f"messages[{i}].content[{j}] has unsupported type {kind!r}", param="messages")
        out.append({"role": role, "content": parts})
    return out, n_images


def parse_chat(body: Any, *, max_bytes: int, max_pixels: int, max_tokens_limit: int = 4096) -> ChatCall:
    """A chat-completions request body → :class:`ChatCall` (or ApiError 400)."""
    from aesformer.engines import SamplingSettings

    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if body.get("stream"):
        raise ApiError(400, "streaming is not supported", param="stream")
    messages, n_images = engine_messages(body.get("messages"), max_bytes=max_bytes, max_pixels=max_pixels)
    texts = [m["content"] if isinstance(m["content"], str) else
             " ".join(p.get("text", "") for p in m["content"] if p.get("type") == "text") for m in messages]

    def num(key, cast, default):
        v = body.get(key)
        if v is None:
            return default
        try:
            return cast(v)
        except (TypeError, ValueError):
            raise ApiError(400, f"'{key}' must be a number, got {v!r}", param=key) from None

    n = num("n", int, 1)
    max_tokens = num("max_completion_tokens", int, None) or num("max_tokens", int, 256)
    temperature, top_p = num("temperature", float, 1.0), num("top_p", float, 1.0)
    seed, top_k = num("seed", int, None), num("top_logprobs", int, 0)
    if not 1 <= n <= 16:
        raise ApiError(400, f"'n' must be between 1 and 16, got {n}", param="n")
    if not 1 <= max_tokens:
        raise ApiError(400, f"'max_tokens' must be at least 1, got {max_tokens}", param="max_tokens")
    if not 0.0 <= temperature <= 2.0:
        raise ApiError(400, f"'temperature' must be between 0 and 2, got {temperature}", param="temperature")
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    if not 0 <= top_k <= 20:
        raise ApiError(400, f"'top_logprobs' must be between 0 and 20, got {top_k}", param="top_logprobs")
    sampling = SamplingSettings(n=n, temperature=temperature, top_p=top_p,
                                max_tokens=min(max_tokens, max_tokens_limit), seed=seed)
    return ChatCall({"messages": messages}, sampling, bool(body.get("logprobs")), top_k if body.get("logprobs") else 0,
                    str(body.get("model") or ""), n_images, [m["role"] for m in messages], texts[-1][-2000:])


def _engine_tokenizer(engine: Any):
    t = getattr(engine, "tokenizer", None)
    try:
        return t() if callable(t) else t
    except Exception:
        return None


def prompt_tokens(engine: Any, request: dict) -> int:
    """Prompt length in tokens as the engine encodes it (0 when unknown)."""
    proc = getattr(engine, "processor", None)
    if proc is None:
        return 0
    from aesformer.engines import prepare_image, prompt_text, request_images

    images = [prepare_image(im, getattr(engine, "max_pixels", None)) for im in request_images(request)]
    enc = proc(text=[prompt_text(proc, request)], images=images or None, return_tensors="pt")
    return int(enc["input_ids"].shape[1])


def first_top_logprobs(engine: Any, requests: Sequence[dict], k: int) -> list[list[dict]]:
    """For each request, the ``k`` most likely first tokens with their log-probs
    (one batched forward pass over the whole vocabulary)."""
    tok = _engine_tokenizer(engine)
    if tok is None or not requests:
        return [[] for _ in requests]
    vocab = len(tok)
    scores = engine.score_tokens(list(requests), list(range(vocab)))
    out = []
    for row in scores:
        top = row.topk(min(int(k), 20, vocab))
        out.append([_token_entry(tok.decode([tid]), lp) for lp, tid in zip(top.values.tolist(), top.indices.tolist())])
    return out


def _token_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": float(logprob), "bytes": list(token.encode("utf-8"))}


def run_chat(engine: Any, calls: Sequence[ChatCall], model_name: str) -> list[dict]:
    """Chat completions for many calls: one ``generate`` per group of calls
    that share their sampling settings (a batch), one forward pass for the
    top log-probs of each group; returns one response body per call."""
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(calls):
        s = c.sampling
        groups.setdefault((s.n, s.temperature, s.top_p, s.max_tokens, s.seed), []).append(i)
    out: list[Optional[dict]] = [None] * len(calls)
    tok = _engine_tokenizer(engine)
    for idx in groups.values():
        batch = [calls[i] for i in idx]
        completions = engine.generate([c.request for c in batch], batch[0].sampling)
        want_top = [c for c in batch if c.top_logprobs]
        tops = iter(first_top_logprobs(engine, [c.request for c in want_top], max(c.top_logprobs for c in want_top))
                    if want_top else [])
        for i, call, group in zip(idx, batch, completions):
            top = next(tops)[: call.top_logprobs] if call.top_logprobs else None
            n_prompt = prompt_tokens(engine, call.request) if call.usage else 0
            out[i] = chat_response(call, group, n_prompt, model_name, tok, top)
    return out  # type: ignore[return-value]


def chat_response(call: ChatCall, completions: Sequence[Any], n_prompt: int, model_name: str, tokenizer: Any,
                  first_top: Optional[list[dict]] = None) -> dict:
    """The ``chat.completion`` object for a call's completions."""
    choices, n_completion = [], 0
    for i, c in enumerate(completions):
        n_completion += len(c.token_ids)
        choice = {"index": i, "message": {"role": "assistant", "content": c.text},
                  "finish_reason": "length" if c.finish_reason == "length" else "stop", "logprobs": None}
        if call.logprobs:
            content = []
            for k, (tid, lp) in enumerate(zip(c.token_ids, c.logprobs)):
                token = tokenizer.decode([tid]) if tokenizer is not None else str(tid)
                entry = _token_entry(token, lp)
                entry["top_logprobs"] = first_top if (k == 0 and first_top) else []
                content.append(entry)
            choice["logprobs"] = {"content": content}
        choices.append(choice)
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name, "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                      "total_tokens": n_prompt + n_completion}}


def models_response(model_name: str) -> dict:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "aesformer"}]}


# -- OpenAI: image edits -------------------------------------------------------------


def image_edit_response(png: bytes, plan: str, seconds: dict, size: tuple[int, int]) -> dict:
    """The ``images.edit`` reply: one image as base64 PNG, the plan as its revised prompt."""
    return {"created": int(time.time()), "data": [{"b64_json": png_b64(png), "revised_prompt": plan}],
            "output_format": "png", "size": f"{size[0]}x{size[1]}", "timings_ms": timings(seconds)}

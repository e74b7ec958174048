"""The two ways a teacher or judge model is reached, behind one interface.

``complete(conversations, sampling) -> list[Reply]``: one reply per
conversation. A conversation is a list of chat messages in the engine format
(:mod:`aesformer.engines`): ``{"role": "user", "content": [{"type": "image",
"image": <PIL>}, {"type": "text", "text": ...}]}``, assistant turns as text.

- :class:`OpenAIChat`: any OpenAI-compatible ``/chat/completions`` endpoint
  over HTTP (urllib, no SDK). Images travel inline as base64 data URLs. It
  retries 429, 5xx, timeouts, refused connections and malformed replies
  with exponential backoff (honouring ``Retry-After``), spaces requests to a
  rate limit, runs a few requests at once, and charges every request to a
  shared :class:`Budget`.
- :class:`EngineChat`: a local engine from :func:`aesformer.engines.make_engine`
  (transformers on CPU, vLLM on GPU); the Ray actor pool in
  ``aesformer.actors.distill_actors`` puts one in each actor.

A reply never raises for a failed request: it carries ``error``. Two things
stop the job instead of one pair: the spending cap (``stopped="budget"``) and
an endpoint that refuses us for good (401/403/404: ``stopped="endpoint"``).
"""
from __future__ import annotations

import base64
import io
import json
import logging
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)


@dataclass
class Reply:
    """One model answer, or why there is none.

    ``requests`` counts the model calls it took (retries included);
    ``first_logprobs`` maps candidate tokens to their log-probs at the first
    generated position when the backend reports them (a judge's reading).
    ``stopped`` is set when the job must stop: "budget" or "endpoint".
    ``failures`` lists every failed attempt's reason (those retried too).
    """

    text: Optional[str] = None
    error: Optional[str] = None
    stopped: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    seconds: float = 0.0
    first_logprobs: Optional[dict[str, float]] = None
    failures: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class BudgetExhausted(RuntimeError):
    """The spending cap is reached: no more model requests."""


class Budget:
    """A spending cap shared by every backend of a job (thread-safe).

    ``max_requests`` / ``max_tokens`` of 0 mean no cap. :meth:`reserve` is
    called before each request and raises :class:`BudgetExhausted` once a cap
    is reached; :meth:`charge` adds the tokens a reply used.
    """

    def __init__(self, max_requests: int = 0, max_tokens: int = 0):
        self.max_requests, self.max_tokens = int(max_requests or 0), int(max_tokens or 0)
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.by_role: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def exhausted_reason(self) -> Optional[str]:
        if self.max_requests and self.requests >= self.max_requests:
            return f"spending cap reached: {self.requests} of {self.max_requests} requests"
        if self.max_tokens and self.tokens >= self.max_tokens:
            return f"spending cap reached: {self.tokens} of {self.max_tokens} tokens"
        return None

    def reserve(self, role: str = "model") -> None:
        with self._lock:
            reason = self.exhausted_reason()
            if reason:
                raise BudgetExhausted(reason)
            self.requests += 1
            self.by_role[role] = self.by_role.get(role, 0) + 1

    def charge(self, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        with self._lock:
            self.prompt_tokens += int(prompt_tokens or 0)
            self.completion_tokens += int(completion_tokens or 0)

    def snapshot(self) -> dict:
        with self._lock:
            return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": self.completion_tokens, "tokens": self.tokens,
                    "by_role": dict(self.by_role), "max_requests": self.max_requests, "max_tokens": self.max_tokens}


class RateLimiter:
    """Spaces request starts at least ``60 / per_minute`` seconds apart (0: no limit)."""

    def __init__(self, per_minute: float = 0.0):
        self.interval = 60.0 / per_minute if per_minute and per_minute > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


# -- images and messages ---------------------------------------------------------------

def image_data_url(image: Any, fmt: str = "jpeg", max_side: int = 1024, quality: int = 90) -> str:
    """A PIL image as a ``data:image/...;base64,`` URL, longer side at most ``max_side``."""
    from PIL import Image

    img = image.convert("RGB")
    if max_side and max(img.size) > max_side:
        s = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BICUBIC)
    buf = io.BytesIO()
    fmt = "jpeg" if fmt.lower() in ("jpg", "jpeg") else "png"
    img.save(buf, format=fmt.upper(), **({"quality": quality} if fmt == "jpeg" else {}))
    return f"data:image/{fmt};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def openai_messages(conversation: Sequence[dict], fmt: str = "jpeg", max_side: int = 1024) -> list[dict]:
    """Engine-format messages → OpenAI chat messages (images as data URLs)."""
    out = []
    for m in conversation:
        content = m.get("content")
        if isinstance(content, str) or content is None:
            out.append({"role": m["role"], "content": content or ""})
            continue
        parts = []
        for p in content:
            if p.get("type") == "image" or "image" in p:
                parts.append({"type": "image_url", "image_url": {"url": image_data_url(p["image"], fmt, max_side)}})
            else:
                parts.append({"type": "text", "text": str(p.get("text", ""))})
        out.append({"role": m["role"], "content": parts})
    return out


# -- OpenAI-compatible endpoint ------------------------------------------------------------

class _Retryable(Exception):
    def __init__(self, message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Fatal(Exception):
    pass


def _retry_after(headers: Any) -> Optional[float]:
    try:
        value = headers.get("Retry-After") if headers is not None else None
        return None if value is None else max(0.0, float(value))
    except (TypeError, ValueError):
        return None


class OpenAIChat:
    """Chat completions from an OpenAI-compatible endpoint.

    ``base_url`` ends before ``/chat/completions`` (e.g.
    ``https://api.openai.com/v1``); the API key is read from the environment
    variable ``api_key_env`` (none sent when unset or empty). Up to
    ``concurrency`` requests run at once; each waits for the rate limiter and
    reserves one request from the budget.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: Optional[str] = "OPENAI_API_KEY",
                 timeout_s: float = 60.0, max_retries: int = 4, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 requests_per_minute: float = 0.0, concurrency: int = 4, budget: Optional[Budget] = None,
                 image_format: str = "jpeg", image_max_side: int = 1024, role: str = "model"):
        import os

        if not base_url:
            raise ValueError("an openai backend needs base_url")
        if not model:
            raise ValueError("an openai backend needs a model name")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.base_url, self.model = base_url.rstrip("/"), model
        self.api_key_env = api_key_env
        self.api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.timeout_s, self.max_retries = float(timeout_s), int(max_retries)
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self.rate = RateLimiter(requests_per_minute)
        self.concurrency = max(1, int(concurrency))
        self.budget = budget or Budget()
        self.image_format, self.image_max_side = image_format, int(image_max_side)
        self.role = role
        self.retries = 0  # requests repeated after a transient failure

    def settings(self) -> dict:
        return {"backend": "openai", "base_url": self.base_url, "model": self.model,
                "image_format": self.image_format, "image_max_side": self.image_max_side}

    def complete(self, conversations: Sequence[Sequence[dict]], sampling: Optional[dict] = None,
                 top_logprobs: int = 0) -> list[Reply]:
        sampling = dict(sampling or {})
        bodies = []
        for conv in conversations:
            body = {"model": self.model, "messages": openai_messages(conv, self.image_format, self.image_max_side),
                    "n": 1}
            for k in ("temperature", "top_p", "max_tokens", "seed"):
                if sampling.get(k) is not None:
                    body[k] = sampling[k]
            if top_logprobs:
                body["logprobs"] = True
                body["top_logprobs"] = int(top_logprobs)
            bodies.append(body)
        if len(bodies) <= 1 or self.concurrency == 1:
            return [self._call(b) for b in bodies]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(bodies))) as pool:
            return list(pool.map(self._call, bodies))

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace") if e.fp is not None else ""
            if e.code == 429 or 500 <= e.code < 600:
                raise _Retryable(f"HTTP {e.code}: {detail}".strip(), _retry_after(e.headers)) from None
            if e.code in (401, 403, 404):
                raise _Fatal(f"HTTP {e.code} from {self.url}: {detail}".strip()) from None
            raise ValueError(f"HTTP {e.code}: {detail}".strip()) from None
        except (socket.timeout, TimeoutError) as e:
            raise _Retryable(f"timed out after {self.timeout_s:g}s ({e})") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (socket.timeout, TimeoutError)):
                raise _Retryable(f"timed out after {self.timeout_s:g}s") from None
            raise _Retryable(f"connection failed: {e.reason}") from None
        except (ConnectionError, OSError) as e:
            raise _Retryable(f"connection failed: {e}") from None
        try:
            payload = json.loads(raw.decode("utf-8"))
            msg = payload["choices"][0]["message"]
            if not isinstance(msg.get("content"), (str, type(None))):
                raise TypeError("message content is not text")
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            raise _Retryable(f"malformed reply ({type(e).__name__}: {str(e)[:120]}): {raw[:120]!r}") from None
        return payload

    def _call(self, body: dict) -> Reply:
        reply = Reply()
        t0 = time.perf_counter()
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                self.budget.reserve(self.role)
            except BudgetExhausted as e:
                reply.stopped, reply.error = "budget", str(e)
                break
            reply.requests += 1
            self.rate.wait()
            try:
                payload = self._post(body)
            except _Retryable as e:
                last = str(e)
                reply.failures.append(last)
                if attempt < self.max_retries:
                    self.retries += 1
                    wait = e.retry_after if e.retry_after is not None else \
                        min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * (0.5 + random.random() / 2)
                    log.warning("%s: %s; retry %d/%d in %.1fs", self.url, last, attempt + 1, self.max_retries, wait)
                    time.sleep(min(wait, self.max_backoff_s))
                continue
            except _Fatal as e:
                reply.stopped, reply.error = "endpoint", str(e)
                reply.failures.append(str(e))
                break
            except ValueError as e:
                reply.error = str(e)
                reply.failures.append(str(e))
                break
            usage = payload.get("usage") or {}
            reply.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            reply.completion_tokens = int(usage.get("completion_tokens") or 0)
            self.budget.charge(reply.prompt_tokens, reply.completion_tokens)
            choice = payload["choices"][0]
            reply.text = choice["message"].get("content") or ""
            reply.first_logprobs = _first_logprobs(choice)
            reply.error = None
            break
        else:
            reply.error = f"gave up after {self.max_retries + 1} tries: {last}"
        reply.seconds = time.perf_counter() - t0
        return reply


def _first_logprobs(choice: dict) -> Optional[dict[str, float]]:
    """{token: logprob} of the first generated position's top_logprobs, if sent."""
    try:
        first = (choice.get("logprobs") or {}).get("content") or []
        if not first:
            return None
        out = {str(t["token"]): float(t["logprob"]) for t in first[0].get("top_logprobs") or []}
        out.setdefault(str(first[0]["token"]), float(first[0]["logprob"]))
        return out
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


# -- local engine ---------------------------------------------------------------------------

class EngineChat:
    """Chat completions and first-token scores from an in-process engine
    (``aesformer.engines``); what each Ray actor of the local pool runs."""

    def __init__(self, engine: Any, *, model: str = "", kind: str = "hf"):
        self.engine, self.model, self.kind = engine, model, kind

    def settings(self) -> dict:
        return {"backend": "local", "engine": self.kind, "model": self.model}

    def complete(self, conversations: Sequence[Sequence[dict]], sampling: Optional[dict] = None,
                 top_logprobs: int = 0) -> list[Reply]:
        from aesformer.engines import SamplingSettings

        s = dict(sampling or {})
        settings = SamplingSettings(n=1, temperature=float(s.get("temperature", 1.0)), top_p=float(s.get("top_p", 1.0)),
                                    max_tokens=int(s.get("max_tokens", 256)), seed=s.get("seed"))
        t0 = time.perf_counter()
        try:
            groups = self.engine.generate([{"messages": list(c)} for c in conversations], settings)
        except Exception as e:  # a model failure is this batch's error, not the job's
            log.exception("local engine failed")
            return [Reply(error=f"engine error: {type(e).__name__}: {e}", requests=1) for _ in conversations]
        dt = (time.perf_counter() - t0) / max(1, len(conversations))
        return [Reply(text=g[0].text, completion_tokens=len(g[0].token_ids), requests=1, seconds=dt) for g in groups]

    def score(self, conversations: Sequence[Sequence[dict]], candidates: Sequence[str]) -> list[Reply]:
        """Replies whose ``first_logprobs`` hold {candidate: log-prob} at the
        first generated position (each candidate read as its first token)."""
        tok = self.engine.tokenizer() if callable(getattr(self.engine, "tokenizer", None)) else self.engine.tokenizer
        ids = [int(tok.encode(c, add_special_tokens=False)[0]) for c in candidates]
        t0 = time.perf_counter()
        try:
            scores = self.engine.score_tokens([{"messages": list(c)} for c in conversations], ids)
        except Exception as e:
            log.exception("local engine failed")
            return [Reply(error=f"engine error: {type(e).__name__}: {e}", requests=1) for _ in conversations]
        dt = (time.perf_counter() - t0) / max(1, len(conversations))
        return [Reply(text="", requests=1, seconds=dt, first_logprobs={c: float(v) for c, v in zip(candidates, row)})
                for row in scores.tolist()]

"""A small OpenAI-compatible chat-completions server backed by a local VLM.

Serves ``POST /v1/chat/completions`` (and ``GET /v1/models``,
``GET /health``) on 127.0.0.1 from any engine of :mod:`aesformer.engines`,
so a local model can be the ``openai`` teacher or judge of the distillation
job, or of any other client that speaks the protocol::

    python -m aesformer.openai_server --model tiny:thinker --port 8000
    python -m aesformer.openai_server --model /models/Qwen2.5-VL-32B-Instruct --engine vllm \\
        --engine-option tensor_parallel_size=2 --api-key-env LOCAL_TEACHER_KEY

What it accepts: messages whose content is text or a list of ``text`` and
``image_url`` parts, images inline as base64 ``data:`` URLs (it never
fetches a URL); ``temperature``, ``top_p``, ``max_tokens`` (or
``max_completion_tokens``), ``n``, ``seed``; ``logprobs`` with
``top_logprobs`` (the top list is filled at the first generated position,
where a judge reads its score; later positions carry the sampled token
only). No streaming, no tools.

Fault injection, for testing clients: ``faults=["429", "timeout", ...]``
at start (each request takes the next one until the list is used up) or a
request header ``X-Aesformer-Fault``. Kinds: ``429`` (with ``Retry-After``),
``500``, ``503``, ``timeout`` (hangs up unanswered after ``fault_delay_s``),
``malformed`` (a 200 whose body is cut-off JSON). Every other reply comes
from the model.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable, Optional
from urllib.parse import parse_qs, urlparse

log = logging.getLogger(__name__)

FAULTS = ("429", "500", "503", "timeout", "malformed")
MAX_BODY_BYTES = 64 << 20


class BadRequest(ValueError):
    pass


def decode_data_url(url: str) -> Any:
    """A ``data:image/...;base64,...`` URL → RGB PIL image."""
    from PIL import Image

    if not isinstance(url, str) or not url.startswith("data:"):
        raise BadRequest("image_url must be a base64 data: URL (this server does not fetch URLs)")
    head, _, payload = url.partition(",")
    if ";base64" not in head:
        raise BadRequest("image data URL must be base64-encoded")
    try:
        img = Image.open(io.BytesIO(base64.b64decode(payload, validate=False)))
        img.load()
    except Exception as e:
        raise BadRequest(f"image does not decode ({type(e).__name__}: {e})") from None
    return img.convert("RGB")


def engine_messages(messages: Any) -> tuple[list[dict], int]:
    """OpenAI messages → engine messages (images as PIL), and the image count."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    out, n_images = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRequest(f"messages[{i}] needs a role of system, user or assistant")
        content = m.get("content")
        if content is None or isinstance(content, str):
            out.append({"role": m["role"], "content": content or ""})
            continue
        if not isinstance(content, list):
            raise BadRequest(f"messages[{i}].content must be text or a list of parts")
        parts = []
        for j, p in enumerate(content):
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(p.get("text", ""))})
            elif kind == "image_url":
                url = p.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                parts.append({"type": "image", "image": decode_data_url(url)})
                n_images += 1
            else:
                raise BadRequest(f"messages[{i}].content[{j}] has unsupported type {kind!r}")
        out.append({"role": m["role"], "content": parts})
    return out, n_images


class ChatServer:
    """The server; ``with ChatServer(engine, "name") as s: s.base_url``."""

    def __init__(self, engine: Any, model_name: str, *, host: str = "127.0.0.1", port: int = 0,
                 api_key: Optional[str] = None, faults: Iterable[str] = (), fault_delay_s: float = 5.0,
                 retry_after_s: float = 0.0, max_tokens_limit: int = 4096):
        bad = [f for f in faults if f not in FAULTS]
        if bad:
            raise ValueError(f"unknown fault(s) {bad}; known: {', '.join(FAULTS)}")
        self.engine, self.model_name = engine, model_name
        self.api_key = api_key or None
        self.faults = list(faults)
        self.fault_delay_s, self.retry_after_s = float(fault_delay_s), float(retry_after_s)
        self.max_tokens_limit = int(max_tokens_limit)
        # one record per chat request (for people and tests to inspect): fault,
        # status, image count, message count and roles, the last message's text
        self.requests: list[dict] = []
        self._lock = threading.Lock()  # one generation at a time
        self._faults_lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # route through logging, quietly
                log.debug("%s " + fmt, self.address_string(), *args)

            def do_GET(self):
                path = urlparse(self.path).path.rstrip("/")
                if path in ("/health", ""):
                    return self._json(200, {"status": "ok"})
                if path == "/v1/models":
                    return self._json(200, {"object": "list", "data": [
                        {"id": server.model_name, "object": "model", "created": 0, "owned_by": "aesformer"}]})
                return self._error(404, f"no route {path}", "not_found")

            def do_POST(self):
                path = urlparse(self.path).path.rstrip("/")
                if path != "/v1/chat/completions":
                    return self._error(404, f"no route {path}", "not_found")
                if server.api_key and self.headers.get("Authorization", "") != f"Bearer {server.api_key}":
                    return self._error(401, "invalid or missing API key", "invalid_api_key")
                fault = self.headers.get("X-Aesformer-Fault") or \
                    (parse_qs(urlparse(self.path).query).get("fault") or [None])[0] or server._next_fault()
                record = {"fault": fault, "images": 0, "messages": 0, "status": None, "time": time.time()}
                server.requests.append(record)
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if length < 0 or length > MAX_BODY_BYTES:
                    record["status"] = 413
                    return self._error(413, f"request body must be 0..{MAX_BODY_BYTES} bytes", "invalid_request_error")
                raw = self.rfile.read(length)
                if fault == "429":
                    record["status"] = 429
                    return self._error(429, "rate limit reached (injected)", "rate_limit_exceeded",
                                       {"Retry-After": f"{server.retry_after_s:g}"})
                if fault in ("500", "503"):
                    record["status"] = int(fault)
                    return self._error(int(fault), "server error (injected)", "server_error")
                if fault == "timeout":
                    # hold the request past the client's timeout, then hang up unanswered
                    record["status"] = "timeout"
                    time.sleep(server.fault_delay_s)
                    self.close_connection = True
                    return
                try:
                    body = json.loads(raw.decode("utf-8"))
                    if not isinstance(body, dict):
                        raise BadRequest("the request body must be a JSON object")
                    answer = server.answer(body, record)
                except BadRequest as e:
                    record["status"] = 400
                    return self._error(400, str(e), "invalid_request_error")
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    record["status"] = 400
                    return self._error(400, f"the request body is not JSON ({e})", "invalid_request_error")
                except Exception as e:  # the model failed: the client may retry
                    log.exception("chat completion failed")
                    record["status"] = 500
                    return self._error(500, f"{type(e).__name__}: {e}", "server_error")
                record["status"] = 200
                if fault == "malformed":
                    text = json.dumps(answer)
                    return self._send(200, text[: max(1, len(text) // 2)].encode(), "application/json")
                return self._json(200, answer)

            def _send(self, status: int, data: bytes, ctype: str, headers: Optional[dict] = None):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout); nothing to do

            def _json(self, status: int, obj: dict, headers: Optional[dict] = None):
                self._send(status, json.dumps(obj).encode(), "application/json", headers)

            def _error(self, status: int, message: str, kind: str, headers: Optional[dict] = None):
                self._json(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.host, self.port = host, self.httpd.server_address[1]
        self._thread: Optional[threading.Thread] = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def _next_fault(self) -> Optional[str]:
        with self._faults_lock:
            return self.faults.pop(0) if self.faults else None

    # -- the model ----------------------------------------------------------------------
    def answer(self, body: dict, record: dict) -> dict:
        from aesformer.engines import SamplingSettings

        if body.get("stream"):
            raise BadRequest("streaming is not supported")
        messages, n_images = engine_messages(body.get("messages"))
        texts = [m["content"] if isinstance(m["content"], str) else
                 " ".join(p.get("text", "") for p in m["content"] if p.get("type") == "text") for m in messages]
        record.update(images=n_images, messages=len(messages), roles=[m["role"] for m in messages],
                      last_text=texts[-1][-2000:])
        try:
            n = int(body.get("n") or 1)
            max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 256)
            temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
            top_p = float(body.get("top_p", 1.0) if body.get("top_p") is not None else 1.0)
            seed = None if body.get("seed") is None else int(body["seed"])
            top_k = int(body.get("top_logprobs") or 0)
        except (TypeError, ValueError) as e:
            raise BadRequest(f"bad sampling parameter: {e}") from None
        if not 1 <= n <= 16 or not 1 <= max_tokens or not 0.0 <= temperature <= 2.0 or not 0.0 < top_p <= 1.0:
            raise BadRequest("need 1 <= n <= 16, max_tokens >= 1, 0 <= temperature <= 2, 0 < top_p <= 1")
        max_tokens = min(max_tokens, self.max_tokens_limit)
        request = {"messages": messages}
        with self._lock:
            groups = self.engine.generate([request], SamplingSettings(n=n, temperature=temperature, top_p=top_p,
                                                                      max_tokens=max_tokens, seed=seed))
            first_top = self._first_top_logprobs(request, top_k) if body.get("logprobs") and top_k else None
            prompt_tokens = self._prompt_tokens(request)
        tok = self._tokenizer()
        choices, completion_tokens = [], 0
        for i, c in enumerate(groups[0]):
            completion_tokens += len(c.token_ids)
            choice = {"index": i, "message": {"role": "assistant", "content": c.text},
                      "finish_reason": "length" if c.finish_reason == "length" else "stop", "logprobs": None}
            if body.get("logprobs"):
                content = []
                for k, (tid, lp) in enumerate(zip(c.token_ids, c.logprobs)):
                    token = tok.decode([tid]) if tok is not None else str(tid)
                    content.append({"token": token, "logprob": float(lp), "bytes": list(token.encode("utf-8")),
                                    "top_logprobs": first_top if (k == 0 and first_top) else []})
                choice["logprobs"] = {"content": content}
            choices.append(choice)
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def _tokenizer(self):
        t = getattr(self.engine, "tokenizer", None)
        try:
            return t() if callable(t) else t
        except Exception:
            return None

    def _prompt_tokens(self, request: dict) -> int:
        proc = getattr(self.engine, "processor", None)
        if proc is None:
            return 0
        try:
            from aesformer.engines import prepare_image, prompt_text, request_images

            images = [prepare_image(im, getattr(self.engine, "max_pixels", None)) for im in request_images(request)]
            enc = proc(text=[prompt_text(proc, request)], images=images or None, return_tensors="pt")
            return int(enc["input_ids"].shape[1])
        except Exception:
            return 0

    def _first_top_logprobs(self, request: dict, k: int) -> Optional[list[dict]]:
        """The ``k`` most likely first tokens with their log-probs (one forward pass)."""
        tok = self._tokenizer()
        if tok is None:
            return None
        vocab = len(tok)
        scores = self.engine.score_tokens([request], list(range(vocab)))[0]
        top = scores.topk(min(int(k), 20, vocab))
        out = []
        for lp, tid in zip(top.values.tolist(), top.indices.tolist()):
            token = tok.decode([tid])
            out.append({"token": token, "logprob": float(lp), "bytes": list(token.encode("utf-8"))})
        return out

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> "ChatServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="openai-server", daemon=True)
        self._thread.start()
        log.info("OpenAI-compatible server for %s on %s", self.model_name, self.base_url)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "ChatServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(model: str, *, engine: str = "hf", host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
          name: Optional[str] = None, cache_dir: Optional[str] = None, **engine_options: Any) -> ChatServer:
    """Load ``model`` (a path, hub id or tiny:<key>) into an engine and start serving it."""
    from aesformer.engines import make_engine
    from aesformer.models import resolve_model

    path = resolve_model(model, cache_dir, config_key="--model")
    return ChatServer(make_engine(engine, path, **engine_options), name or model, host=host, port=port,
                      api_key=api_key).start()


def main(argv: Optional[list[str]] = None) -> None:
    import os

    p = argparse.ArgumentParser(prog="python -m aesformer.openai_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local path, hub id or tiny:<key>")
    p.add_argument("--engine", default="hf", choices=("hf", "vllm"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None, help="model id reported to clients (default: --model)")
    p.add_argument("--api-key-env", default=None, help="environment variable holding the API key clients must send")
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="engine option, e.g. tensor_parallel_size=2 (repeatable)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options: dict[str, Any] = {}
    for item in args.engine_option:
        k, _, v = item.partition("=")
        try:
            options[k] = json.loads(v)
        except ValueError:
            options[k] = v
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    server = serve(args.model, engine=args.engine, host=args.host, port=args.port, api_key=key, name=args.name,
                   **options)
    print(f"serving {server.model_name} at {server.base_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()

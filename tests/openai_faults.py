"""A small OpenAI-compatible chat server that misbehaves on purpose, for
tests of clients (the distillation job's ``openai`` teacher and judge).

Its good answers come from a real engine through the same functions the
Serve application uses (``aesformer.serving.parse_chat`` / ``run_chat``);
its bad ones are injected: ``faults=["429", "timeout", ...]`` at start (each
request takes the next one until the list is used up) or a request header
``X-Aesformer-Fault``. Kinds: ``429`` (with ``Retry-After``), ``500``,
``503``, ``timeout`` (hangs up unanswered after ``fault_delay_s``),
``malformed`` (a 200 whose body is cut-off JSON). Every request is recorded
in ``server.requests`` (fault, status, image count, roles, last text).

    with FaultyChatServer(make_engine("hf", path), "tiny-thinker", faults=["429"]) as server:
        OpenAIChat(server.base_url, server.model_name, ...)
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable, Optional
from urllib.parse import urlparse

from aesformer.serving import ApiError, models_response, parse_chat, run_chat

FAULTS = ("429", "500", "503", "timeout", "malformed")
MAX_BODY_BYTES = 64 << 20


class FaultyChatServer:
    def __init__(self, engine: Any, model_name: str, *, api_key: Optional[str] = None, faults: Iterable[str] = (),
                 fault_delay_s: float = 5.0, retry_after_s: float = 0.0):
        bad = [f for f in faults if f not in FAULTS]
        if bad:
            raise ValueError(f"unknown fault(s) {bad}; known: {', '.join(FAULTS)}")
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.faults = list(faults)
        self.fault_delay_s, self.retry_after_s = float(fault_delay_s), float(retry_after_s)
        self.requests: list[dict] = []
        self._lock = threading.Lock()  # one generation at a time
        self._faults_lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):
                pass

            def do_GET(self):
                if urlparse(self.path).path.rstrip("/") == "/v1/models":
                    return self._json(200, models_response(server.model_name))
                return self._error(ApiError(404, f"no route {self.path}", "not_found"))

            def do_POST(self):
                if urlparse(self.path).path.rstrip("/") != "/v1/chat/completions":
                    return self._error(ApiError(404, f"no route {self.path}", "not_found"))
                if server.api_key and self.headers.get("Authorization", "") != f"Bearer {server.api_key}":
                    return self._error(ApiError(401, "invalid or missing API key", "invalid_api_key"))
                fault = self.headers.get("X-Aesformer-Fault") or server._next_fault()
                record = {"fault": fault, "images": 0, "messages": 0, "status": None, "time": time.time()}
                server.requests.append(record)
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 <= length <= MAX_BODY_BYTES:
                    record["status"] = 413
                    return self._error(ApiError(413, "request body too large"))
                raw = self.rfile.read(length)
                if fault == "429":
                    record["status"] = 429
                    return self._error(ApiError(429, "rate limit reached (injected)", "rate_limit_exceeded",
                                                {"Retry-After": f"{server.retry_after_s:g}"}))
                if fault in ("500", "503"):
                    record["status"] = int(fault)
                    return self._error(ApiError(int(fault), "server error (injected)", "server_error"))
                if fault == "timeout":  # hold the request past the client's timeout, then hang up
                    record["status"] = "timeout"
                    time.sleep(server.fault_delay_s)
                    self.close_connection = True
                    return
                try:
                    call = parse_chat(json.loads(raw.decode("utf-8")), max_bytes=MAX_BODY_BYTES,
                                      max_pixels=40_000_000)
                    record.update(images=call.n_images, messages=len(call.roles), roles=call.roles,
                                  last_text=call.last_text)
                    with server._lock:
                        answer = run_chat(server.engine, [call], server.model_name)[0]
                except ApiError as e:
                    record["status"] = e.status
                    return self._error(e)
                except ValueError as e:
                    record["status"] = 400
                    return self._error(ApiError(400, f"the request body is not JSON ({e})"))
                record["status"] = 200
                if fault == "malformed":
                    text = json.dumps(answer)
                    return self._send(200, text[: max(1, len(text) // 2)].encode())
                return self._json(200, answer)

            def _send(self, status: int, data: bytes, headers: Optional[dict] = None):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up

            def _json(self, status: int, obj: dict, headers: Optional[dict] = None):
                self._send(status, json.dumps(obj).encode(), headers)

            def _error(self, e: ApiError):
                self._json(e.status, e.body(), e.headers)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread: Optional[threading.Thread] = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _next_fault(self) -> Optional[str]:
        with self._faults_lock:
            return self.faults.pop(0) if self.faults else None

    def __enter__(self) -> "FaultyChatServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

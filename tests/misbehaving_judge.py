"""An OpenAI-compatible chat server on 127.0.0.1 that misbehaves on cue.

``script`` lists how the first requests are answered, in order: ``429``,
``500``, ``truncated`` (a 200 whose JSON body is cut off), ``no_verdict`` (a
well-formed reply that holds no verdict), or ``ok``; after the script every
request gets ``ok``: ``{"winner": <winner>}``. ``requests`` counts them all.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class MisbehavingJudge:
    def __init__(self, script=(), winner: str = "A"):
        self.script, self.winner = list(script), winner
        self.requests = 0
        self.bodies: list[dict] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                with outer._lock:
                    outer.requests += 1
                    outer.bodies.append(body)
                    action = outer.script.pop(0) if outer.script else "ok"
                if action in ("429", "500"):
                    return self._send(int(action), json.dumps({"error": {"message": f"scripted {action}"}}).encode())
                content = {"ok": json.dumps({"winner": outer.winner, "reason": "scripted"}),
                           "no_verdict": "Both photos have their charms; I would rather not choose."}.get(action)
                payload = json.dumps({"id": "x", "object": "chat.completion", "model": body.get("model"),
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": content or ""}}],
                                      "usage": {"prompt_tokens": 10, "completion_tokens": 5}}).encode()
                if action == "truncated":
                    payload = payload[: len(payload) // 2]
                self._send(200, payload)

            def _send(self, status, data):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

"""The human rating page: a small HTTP server on 127.0.0.1.

A rater enters an id and is shown two images of one comparison (a system's
output and the poor or good photo) side by side, in an order drawn at random,
with nothing that names the system: the page and the image URLs speak only
of a pair number and ``left``/``right``. The rater picks the better one or a
tie. Each vote goes to the store's ``votes`` table with rater, pair, which
image was on which side, the choice and the time. A rater is never shown a
pair they already voted on; when none is left the page says so.

Routes: ``GET /`` the page; ``GET /api/next?rater=`` the next pair;
``GET /img/<n>/<left|right>?rater=`` an image; ``POST /api/vote``
``{"rater", "pair", "choice": "left" | "right" | "tie"}``.
"""
from __future__ import annotations

import json
import logging
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, urlparse

from aesformer.evaluation.store import Store

log = logging.getLogger(__name__)

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Which photo is better?</title>
<style>body{font-family:sans-serif;margin:2em}#pair img{max-width:45vw;max-height:70vh;margin:0 1em}
button{font-size:1.1em;margin:0.5em}</style></head><body>
<h1>Which photo is better?</h1>
<div id="login"><label>Rater id <input id="rater" autocomplete="off"></label> <button id="start">Start</button></div>
<div id="pair" hidden><div><img id="left" alt="left photo"><img id="right" alt="right photo"></div>
<button id="vote-left">Left is better</button><button id="vote-tie">About the same</button>
<button id="vote-right">Right is better</button></div>
<p id="status"></p><p id="done" hidden>No pairs left for you. Thank you!</p>
<script>
let rater = null, pair = null, votes = 0;
async function next() {
  const r = await (await fetch('/api/next?rater=' + encodeURIComponent(rater))).json();
  if (r.done) { document.getElementById('pair').hidden = true; document.getElementById('done').hidden = false; return; }
  pair = r.pair;
  document.getElementById('left').src = r.left;
  document.getElementById('right').src = r.right;
  document.getElementById('pair').hidden = false;
  document.getElementById('status').textContent = votes + ' votes, ' + r.remaining + ' pairs left';
}
async function vote(choice) {
  const r = await fetch('/api/vote', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                      body: JSON.stringify({rater: rater, pair: pair, choice: choice})});
  if (r.ok) { votes += 1; }
  await next();
}
document.getElementById('start').onclick = () => {
  rater = document.getElementById('rater').value.trim();
  if (!rater) return;
  document.getElementById('login').hidden = true;
  next();
};
for (const c of ['left', 'right', 'tie']) document.getElementById('vote-' + c).onclick = () => vote(c);
</script></body></html>"""


class RatingServer:
    """Serves ``pairs`` (``[{"pair", "output", "reference"}]``, from the
    evaluate job's ``pairs.json``) and stores votes in ``store``."""

    def __init__(self, store: Store, pairs: list[dict], *, host: str = "127.0.0.1", port: int = 0,
                 seed: Optional[int] = None):
        self.store, self.pairs = store, list(pairs)
        self.index = {p["pair"]: i for i, p in enumerate(self.pairs)}
        self.rng = random.Random(seed)
        self.assigned: dict[tuple[str, int], tuple[str, str]] = {}  # (rater, n) -> (left, right) image roles
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):
                log.debug("rating: " + fmt, *args)

            def do_GET(self):
                url = urlparse(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/":
                    return self._send(200, PAGE.encode(), "text/html; charset=utf-8")
                if url.path == "/api/next":
                    if not q.get("rater"):
                        return self._json(400, {"error": "rater is required"})
                    return self._json(200, outer.next_pair(q["rater"]))
                parts = url.path.strip("/").split("/")
                if len(parts) == 3 and parts[0] == "img" and parts[2] in ("left", "right") and parts[1].isdigit():
                    path = outer.image(q.get("rater", ""), int(parts[1]), parts[2])
                    if path is None:
                        return self._json(404, {"error": "no such image"})
                    return self._send(200, Path(path).read_bytes(), "image/png")
                self._json(404, {"error": "not found"})

            def do_POST(self):
                if urlparse(self.path).path != "/api/vote":
                    return self._json(404, {"error": "not found"})
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                    ok, message = outer.vote(str(body["rater"]), int(body["pair"]), str(body["choice"]))
                except (ValueError, KeyError, TypeError) as e:
                    return self._json(400, {"error": f"bad vote: {e}"})
                self._json(200 if ok else 409, {"ok": ok, "message": message})

            def _json(self, status, obj):
                self._send(status, json.dumps(obj).encode(), "application/json")

            def _send(self, status, data, ctype):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/"

    def next_pair(self, rater: str) -> dict:
        """A pair the rater has not voted on (a pending one first), sides drawn at random."""
        voted = self.store.voted_pairs(rater)
        with self._lock:
            left = [i for i, p in enumerate(self.pairs) if p["pair"] not in voted]
            if not left:
                return {"done": True, "remaining": 0}
            pending = [i for i in left if (rater, i) in self.assigned]
            n = pending[0] if pending else self.rng.choice(left)
            if (rater, n) not in self.assigned:
                roles = ["output", "reference"]
                self.rng.shuffle(roles)
                self.assigned[(rater, n)] = (roles[0], roles[1])
        return {"done": False, "pair": n, "remaining": len(left), "left": f"/img/{n}/left?rater={rater}",
                "right": f"/img/{n}/right?rater={rater}"}

    def image(self, rater: str, n: int, side: str) -> Optional[str]:
        with self._lock:
            roles = self.assigned.get((rater, n))
        if roles is None or not 0 <= n < len(self.pairs):
            return None
        return self.pairs[n][roles[0] if side == "left" else roles[1]]

    def vote(self, rater: str, n: int, choice: str) -> tuple[bool, str]:
        if choice not in ("left", "right", "tie"):
            return False, f"choice must be left, right or tie, got {choice!r}"
        with self._lock:
            roles = self.assigned.get((rater, n))
        if roles is None:
            return False, "this pair was not shown to this rater"
        stored = self.store.put_vote(rater, self.pairs[n]["pair"], roles[0], roles[1], choice)
        return stored, "stored" if stored else "already voted on this pair"

    def start(self) -> "RatingServer":
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

"""The Serve application over real HTTP on 127.0.0.1: every route, every bad
input, the bearer token, the official ``openai`` client, batching in the
thinker, a full queue, a timeout, editor autoscaling, the distillation job
with the application as its openai teacher, and the web page in headless
Chromium. One Ray and one Serve start for the whole module."""
from __future__ import annotations

import base64
import io
import json
import os
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests
from PIL import Image

from aesformer.actions import DIMENSIONS, ActionPlan
from browser import chromium_page, needs_chromium
from helpers import free_port

pytestmark = pytest.mark.timeout(900)

TOKEN_ENV, TOKEN = "AESF_SERVE_TEST_TOKEN", "serve-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BYTES, MAX_PIXELS = 300_000, 1_000_000
PLAN = ActionPlan(ratio="crop to 4:3", composition="zoom in a little", camera="lower the camera",
                  position="move the subject left", pose="keep the pose", focus="keep the focus",
                  color="keep the colours").render()


@pytest.fixture(scope="module")
def app(tiny_models):
    from aesformer.cluster import shutdown_ray
    from aesformer.config import load_config
    from aesformer.jobs.serve import start, stop
    from aesformer.serving import ServeConfig

    os.environ[TOKEN_ENV] = TOKEN  # before Ray starts: the replicas inherit it
    cfg = load_config(ServeConfig, "serve", [
        "profile=tiny", "tracking.enabled=false", "ray.num_cpus=8", "ray.ship_code=false",
        f"http.port={free_port()}", f"http.api_key_env={TOKEN_ENV}", "http.request_timeout_s=120",
        f"http.max_image_bytes={MAX_BYTES}", f"http.max_image_pixels={MAX_PIXELS}", "http.retry_after_s=2",
        "think.max_tokens=12", "think.max_batch_size=8", "think.batch_wait_timeout_s=0.2",
        "edit.steps=3", "edit.max_steps=400",
        "edit.deployment.max_ongoing_requests=2", "edit.deployment.max_queued_requests=8",
        "edit.deployment.autoscaling.min_replicas=1", "edit.deployment.autoscaling.max_replicas=2",
        "edit.deployment.autoscaling.target_ongoing_requests=1",
        "edit.deployment.autoscaling.upscale_delay_s=1", "edit.deployment.autoscaling.downscale_delay_s=4",
        "edit.deployment.autoscaling.metrics_interval_s=0.5", "edit.deployment.autoscaling.look_back_period_s=2",
    ])
    url = start(cfg)
    try:
        yield {"url": url, "cfg": cfg}
    finally:
        stop(cfg)
        shutdown_ray()


# -- inputs ------------------------------------------------------------------------------

def photo(size=(96, 64)) -> Image.Image:
    from aesformer.samples import sample_photos

    return sample_photos(1)[0][1].resize(size, Image.BICUBIC)


def encoded(image: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def bomb_png(w: int, h: int) -> bytes:
    """A valid grey PNG of w×h zeros: a few kilobytes that decode to w·h pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = zlib.compress(b"\0" * ((w + 1) * h), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def post(app, route, files=None, data=None, headers=AUTH, timeout=300, **kw):
    return requests.post(app["url"] + route, files=files, data=data, headers=headers, timeout=timeout, **kw)


def image_file(data: bytes, name="photo.png", ctype="image/png"):
    return {"image": (name, data, ctype)}


def error_of(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status
    return err["message"]


class CountingServer:
    """An HTTP server on 127.0.0.1 that counts requests: a URL the API must never fetch."""

    def __init__(self):
        self.hits = 0
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits += 1
                data = encoded(photo())
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/photo.png"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# -- health, page, auth --------------------------------------------------------------------

def test_health_readiness_and_the_page_need_no_token(app):
    assert requests.get(app["url"] + "/healthz", timeout=30).json() == {"status": "ok"}
    ready = requests.get(app["url"] + "/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert ready.json()["thinker"]["engine"] == "hf" and ready.json()["editor"]["model"].endswith("editor")
    page = requests.get(app["url"] + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'type="file"' in html and "v1/reconstruct" in html
    # no external assets: nothing is loaded from another origin
    assert "http://" not in html and "https://" not in html and "<link" not in html and "src=\"/" not in html


def test_the_api_answers_401_without_the_bearer_token(app):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = requests.get(app["url"] + "/v1/models", headers=headers, timeout=30)
        assert "bearer token" in error_of(r, 401) and r.headers["WWW-Authenticate"] == "Bearer"
    r = post(app, "/v1/reconstruct", files=image_file(encoded(photo())), headers={})
    error_of(r, 401)
    models = requests.get(app["url"] + "/v1/models", headers=AUTH, timeout=30).json()
    assert models["data"][0]["id"] == "aesthinker" and models["object"] == "list"


def test_an_unknown_route_is_a_json_404(app):
    r = requests.get(app["url"] + "/v1/nothing", headers=AUTH, timeout=30)
    assert "no route GET /v1/nothing" in error_of(r, 404)


# -- the routes ----------------------------------------------------------------------------

def _check_dimensions(plan):
    assert [d["index"] for d in plan["dimensions"]] == list(range(1, 8))
    assert [d["header"] for d in plan["dimensions"]] == [d.header for d in DIMENSIONS]


def test_plan_is_the_thinker_alone(app):
    r = post(app, "/v1/plan", files=image_file(encoded(photo(), "JPEG"), "p.jpg", "image/jpeg"), data={"seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    _check_dimensions(body["plan"])
    assert isinstance(body["plan"]["text"], str) and body["plan"]["parsed"] in (True, False)
    assert body["input"] == {"width": 96, "height": 64, "model_width": 96, "model_height": 64}
    assert set(body["timings_ms"]) == {"think", "total"} and body["timings_ms"]["think"] > 0


def test_reconstruct_runs_thinker_then_editor_and_returns_a_png_of_the_asked_size(app):
    r = post(app, "/v1/reconstruct", files=image_file(encoded(photo())), data={"seed": 1, "width": 80, "height": 48})
    assert r.status_code == 200, r.text
    body = r.json()
    _check_dimensions(body["plan"])
    out = Image.open(io.BytesIO(base64.b64decode(body["image"]["b64_png"])))
    assert out.format == "PNG" and out.size == (80, 48) == (body["image"]["width"], body["image"]["height"])
    assert set(body["timings_ms"]) == {"decode", "think", "edit", "total"}
    assert body["timings_ms"]["total"] >= body["timings_ms"]["think"] + body["timings_ms"]["edit"]


def test_a_given_plan_skips_the_thinker_and_is_shown_by_dimension(app):
    r = post(app, "/v1/reconstruct", files=image_file(encoded(photo())), data={"plan": PLAN, "steps": 2})
    assert r.status_code == 200, r.text
    plan = r.json()["plan"]
    assert plan["parsed"] is True and plan["text"] == PLAN
    assert [d["text"] for d in plan["dimensions"]] == list(ActionPlan.parse(PLAN).to_dict().values())
    assert "think" not in r.json()["timings_ms"]
    # the default output size: the editor's output area (12288 pixels) at the photo's aspect on a
    # 32-pixel grid: 96x64 (3:2) → 128x96
    assert (r.json()["image"]["width"], r.json()["image"]["height"]) == (128, 96)


def test_exif_orientation_is_honoured(app):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90° clockwise: portrait
    data = encoded(photo((96, 48)), "JPEG", exif=exif.tobytes())
    r = post(app, "/v1/reconstruct", files=image_file(data, "exif.jpg", "image/jpeg"), data={"plan": PLAN})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["input"] == {"width": 96, "height": 48, "model_width": 48, "model_height": 96}
    assert body["image"]["height"] > body["image"]["width"]


@pytest.mark.parametrize("case, status, words", [
    ("text part", 415, "has content type 'text/plain'"),
    ("json body", 415, "send multipart/form-data"),
    ("not an image", 400, "is not an image that decodes"),
    ("empty", 400, "is empty (zero bytes)"),
    ("over the byte limit", 413, f"over the limit of {MAX_BYTES} bytes"),
    ("over the pixel limit", 413, f"6000x6000 = 36000000 pixels, over the limit of {MAX_PIXELS} pixels (not decoded)"),
    ("decompression bomb", 413, "decompression bomb"),
    ("no image", 400, "missing the 'image' file field"),
    ("text image", 400, "must be a file upload"),
    ("bad steps", 400, "'steps' must be between 2 and 400, got 1"),
    ("bad seed", 400, "'seed' must be an integer"),
    ("bad width", 400, "'width' must be between 16 and 8192"),
    ("bad timeout", 400, "'X-Request-Timeout' must be a number"),
])
def test_bad_input_is_a_4xx_json_error_that_names_the_problem(app, case, status, words):
    good = encoded(photo())
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8))
    kw = {
        "text part": dict(files=image_file(b"just some text", "notes.txt", "text/plain")),
        "json body": dict(json={"image": "x"}),
        "not an image": dict(files=image_file(b"\x89PNG but not really" * 20)),
        "empty": dict(files=image_file(b"")),
        "over the byte limit": dict(files=image_file(encoded(noise))),
        "over the pixel limit": dict(files=image_file(bomb_png(6000, 6000))),
        "decompression bomb": dict(files=image_file(bomb_png(13500, 13500))),
        "no image": dict(data={"seed": "1"}, files={"other": ("a.png", good, "image/png")}),
        "text image": dict(data={"image": "a photo"}),
        "bad steps": dict(files=image_file(good), data={"steps": "1"}),
        "bad seed": dict(files=image_file(good), data={"seed": "one"}),
        "bad width": dict(files=image_file(good), data={"width": "9"}),
        "bad timeout": dict(files=image_file(good), headers={**AUTH, "X-Request-Timeout": "soon"}),
    }[case]
    if case == "text image":  # a plain text field (no file): force multipart with a dummy part
        kw["files"] = {"note": (None, "x")}
    r = post(app, "/v1/reconstruct", **kw)
    assert words in error_of(r, status)


@pytest.mark.parametrize("route", ["/v1/reconstruct", "/v1/plan", "/v1/images/edits"])
def test_a_url_in_an_image_field_is_refused_and_never_fetched(app, route):
    target = CountingServer()
    try:
        r = post(app, route, files={"image": (None, target.url), "prompt": (None, PLAN)})
        assert "is a URL; this API never fetches URLs" in error_of(r, 400)
        r = post(app, "/v1/chat/completions", json={"model": "aesthinker", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": target.url}}]}]})
        assert "never fetches URLs" in error_of(r, 400)
        time.sleep(0.5)
        assert target.hits == 0
    finally:
        target.close()


def test_bad_chat_requests(app):
    r = post(app, "/v1/chat/completions", data="{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert "not JSON" in error_of(r, 400)
    r = post(app, "/v1/chat/completions", data="hi", headers={**AUTH, "Content-Type": "text/plain"})
    assert "send application/json" in error_of(r, 415)
    r = post(app, "/v1/chat/completions", json={"messages": []})
    assert "'messages' must be a non-empty list" in error_of(r, 400)
    r = post(app, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "top_p": 0})
    assert "'top_p' must be in (0, 1]" in error_of(r, 400)
    bad = "data:image/png;base64," + base64.b64encode(b"no image here").decode()
    r = post(app, "/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": bad}}]}]})
    assert "is not an image that decodes" in error_of(r, 400)


# -- the official openai client ------------------------------------------------------------

def test_openai_client_images_edit(app):
    from openai import OpenAI

    client = OpenAI(base_url=app["url"] + "/v1", api_key=TOKEN, max_retries=0, timeout=300)
    res = client.images.edit(image=("photo.png", encoded(photo()), "image/png"), prompt=PLAN, size="64x96",
                             model="aesformer")
    out = Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json)))
    assert out.size == (64, 96) and res.data[0].revised_prompt == PLAN
    # no prompt: the thinker writes the plan
    res = client.images.edit(image=("photo.png", encoded(photo()), "image/png"), prompt="", model="aesformer")
    assert res.data[0].b64_json and res.data[0].revised_prompt is not None


def test_openai_client_chat_completions_with_an_image_and_logprobs(app):
    from openai import OpenAI

    client = OpenAI(base_url=app["url"] + "/v1", api_key=TOKEN, max_retries=0, timeout=300)
    assert [m.id for m in client.models.list()] == ["aesthinker"]
    url = "data:image/png;base64," + base64.b64encode(encoded(photo())).decode()
    res = client.chat.completions.create(
        model="aesthinker", max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=3,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": "Rate this photo from 0 to 5."}]}])
    choice = res.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    tokens = choice.logprobs.content
    assert 1 <= len(tokens) <= 4 and res.usage.completion_tokens == len(tokens)
    top = tokens[0].top_logprobs
    assert len(top) == 3 and top[0].logprob >= top[1].logprob >= top[2].logprob
    # greedy: the first token is the most likely one
    assert top[0].token == tokens[0].token and abs(top[0].logprob - tokens[0].logprob) < 1e-2
    assert res.usage.prompt_tokens > 10


# -- batching, queue, timeout, autoscaling -------------------------------------------------

def _handle(app, name):
    from ray import serve

    return serve.get_deployment_handle(name, app_name=app["cfg"].app_name)


def test_the_thinker_batches_concurrent_requests(app):
    thinker = _handle(app, "Thinker")
    before = len(thinker.batch_sizes.remote().result())
    data = encoded(photo())
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda i: post(app, "/v1/plan", files=image_file(data), data={"seed": 0}), range(8)))
    assert [r.status_code for r in rs] == [200] * 8
    sizes = thinker.batch_sizes.remote().result()[before:]
    assert sum(sizes) == 8 and max(sizes) >= 2, sizes


def _editor_replicas(app) -> dict:
    from ray import serve

    states = serve.status().applications[app["cfg"].app_name].deployments["Editor"].replica_states
    return {str(getattr(k, "value", k)): v for k, v in states.items()}


def _wait_replicas(app, n, timeout):
    t0 = time.time()
    while time.time() - t0 < timeout:
        states = _editor_replicas(app)
        if states.get("RUNNING", 0) == n and sum(states.values()) == n:
            return time.time() - t0
        time.sleep(0.5)
    raise AssertionError(f"the editor did not reach {n} replicas in {timeout}s: {_editor_replicas(app)}")


def test_the_editor_scales_to_two_replicas_under_a_burst_and_back_to_one(app):
    """Min 1, max 2, target 1 ongoing request: 8 requests kept in flight bring
    a second replica up (it loads its models first), then it goes away."""
    _wait_replicas(app, 1, 120)
    data = encoded(photo())
    seen, stop, codes = [], threading.Event(), []

    def client():
        while not stop.is_set():
            r = post(app, "/v1/reconstruct", files=image_file(data), data={"plan": PLAN, "steps": 8})
            codes.append(r.status_code)

    with ThreadPoolExecutor(8) as pool:
        for _ in range(8):
            pool.submit(client)
        try:
            t0 = time.time()
            while time.time() - t0 < 400:
                states = _editor_replicas(app)
                seen.append(states)
                if states.get("RUNNING", 0) == 2:
                    break
                time.sleep(0.5)
        finally:
            stop.set()
    assert any(s.get("RUNNING", 0) == 2 for s in seen), seen[-5:]
    assert set(codes) == {200}, codes
    _wait_replicas(app, 1, 120)


def test_a_full_queue_answers_503_with_retry_after(app):
    """Editor: 2 replicas at most × 2 ongoing + 8 queued at the ingress: 24
    requests at once overflow it."""
    data = encoded(photo())
    with ThreadPoolExecutor(24) as pool:
        rs = list(pool.map(lambda i: post(app, "/v1/reconstruct", files=image_file(data),
                                          data={"plan": PLAN, "steps": 20}), range(24)))
    codes = [r.status_code for r in rs]
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, codes
    full = next(r for r in rs if r.status_code == 503)
    assert full.headers["Retry-After"] == "2" and "queue is full" in full.json()["error"]["message"]


def test_a_request_past_its_timeout_is_an_error_and_the_replica_goes_on(app):
    t0 = time.time()
    r = post(app, "/v1/reconstruct", files=image_file(encoded(photo())), data={"plan": PLAN, "steps": 400},
             headers={**AUTH, "X-Request-Timeout": "1"})
    assert "ran past its time limit" in error_of(r, 504) and time.time() - t0 < 60
    r = post(app, "/v1/reconstruct", files=image_file(encoded(photo())), data={"plan": PLAN})
    assert r.status_code == 200, r.text


# -- the distillation job with the application as its teacher ------------------------------

def test_the_distillation_job_uses_the_application_as_its_openai_teacher(app, tmp_path):
    from aesformer.data import ShardWriter, make_pair
    from aesformer.jobs.distill import main
    from aesformer.synth import poor_framing

    rng = np.random.default_rng(5)
    rows = []
    for k in range(2):
        good = photo((128, 96))
        poor, _ = poor_framing(good, rng)
        rows.append(make_pair(f"pair{k}", poor, good, video_id="v", segment_start=0.0, segment_end=1.0,
                              split="train"))
    with ShardWriter(tmp_path / "pairs", shard_rows=4) as w:
        w.write_many(rows)
    out = tmp_path / "distill"
    s = main([f"input={tmp_path / 'pairs'}", f"output={out}", "profile=tiny", "tracking.enabled=false",
              "transcript.enabled=false", "chunk_size=2", "teacher.kind=openai",
              f"teacher.openai.base_url={app['url']}/v1", "teacher.openai.model=aesthinker",
              f"teacher.openai.api_key_env={TOKEN_ENV}", "teacher.openai.timeout_s=120", "teacher.max_tokens=12",
              "validator.max_rounds=1"])["summary"]
    # the tiny thinker writes no plan: each pair is rejected with that reason, after one request each
    assert s["requests"]["this_run"]["requests"] == 2 and s["stopped"] is None
    assert s["accepted"] + sum(s["rejected"].values()) == 2 and s["failed"] == {}
    attempts = [json.loads(x) for x in (out / "attempts.jsonl").read_text().splitlines()]
    assert len(attempts) == 2 and all(a["text"] is not None for a in attempts)


# -- the page in a real browser ------------------------------------------------------------

@needs_chromium
def test_the_page_reconstructs_an_uploaded_photo_in_chromium(app, tmp_path_factory):
    from aesformer.samples import sample_photos

    folder = tmp_path_factory.mktemp("browser")
    name, real = sample_photos(1)[0]
    upload = folder / f"{name}.jpg"
    real.save(upload, quality=90)
    shot = folder / "serve_page.png"
    with chromium_page() as page:
        page.goto(app["url"] + "/")
        page.fill("#token", TOKEN)
        page.set_input_files("#photo", str(upload))
        page.click("#go")
        assert "Working" in page.inner_text("#status")
        page.wait_for_selector("#result:not([hidden])", timeout=300_000)
        assert page.inner_text("#status").startswith("Done in")
        size = page.evaluate("() => { const i = document.getElementById('output-img');"
                             " return [i.complete, i.naturalWidth, i.naturalHeight]; }")
        assert size[0] and size[1] > 0 and size[2] > 0
        assert page.evaluate("() => document.getElementById('input-img').naturalWidth") == real.width
        rows = page.locator("tr.dimension th").all_inner_texts()
        assert rows == [f"({d.index}) {d.header}" for d in DIMENSIONS]
        href = page.get_attribute("#download", "href")
        assert href.startswith("data:image/png;base64,")
        page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] > 0
    print(f"screenshot: {shot}")

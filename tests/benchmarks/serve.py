"""Serving benchmark on the tiny models: p50/p99 latency and throughput of
``POST /v1/reconstruct`` at concurrency 1, 4 and 8, against a direct
in-process call of the same pipeline (``AesFormer.reconstruct`` with the same
settings) measured in the same run; and the thinker's throughput on
``POST /v1/plan`` at concurrency 8 with batching (``@serve.batch``, up to 8)
and with a max batch size of 1. Prints one JSON object.

    python tests/benchmarks/serve.py [--requests N] [--levels 1,4,8]

Figures: ``serve_added_p50_ms_c1`` (Serve's p50 minus the direct p50 at
concurrency 1; goal <= 20 ms) and ``thinker_batching_throughput_ratio_c8``
(batched ÷ max batch size 1; goal >= 2).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import io
import json
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

COMMON = ["profile=tiny", "tracking.enabled=false", "ray.num_cpus=8", "ray.ship_code=false",
          # the tiny profile's plan length (64 tokens) and editing steps (4)
          # fixed replica counts: latency, not autoscaling, is measured here
          "edit.deployment.autoscaling.max_replicas=1", "edit.deployment.max_ongoing_requests=8",
          "edit.deployment.max_queued_requests=-1", "think.deployment.max_queued_requests=-1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stats(latencies: list[float], wall: float) -> dict:
    xs = sorted(latencies)
    p99 = xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]
    return {"p50_ms": round(statistics.median(xs) * 1000, 1), "p99_ms": round(p99 * 1000, 1),
            "throughput_rps": round(len(xs) / wall, 3), "requests": len(xs)}


def load(concurrency: int, n: int, call) -> dict:
    """``n`` calls from ``concurrency`` threads; latency of each and the throughput."""
    latencies: list[float] = []
    lock = threading.Lock()

    def one(i):
        t = time.perf_counter()
        call(i)
        with lock:
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    return stats(latencies, time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=16, help="requests per measurement")
    p.add_argument("--levels", default="1,4,8")
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    import requests
    import torch
    from ray import serve

    torch.set_num_threads(1)
    from aesformer.actors.serve_app import build
    from aesformer.config import load_config
    from aesformer.jobs.serve import start, stop
    from aesformer.pipeline import AesFormer
    from aesformer.samples import sample_photos
    from aesformer.serving import ServeConfig
    from aesformer.tiny import ensure_tiny_models

    load_before = open("/proc/loadavg").read().split()[:3]
    models = ensure_tiny_models()
    cfg = load_config(ServeConfig, "serve", COMMON + [f"http.port={free_port()}"])
    single = load_config(ServeConfig, "serve", COMMON + ["think.max_batch_size=1", "app_name=batch1"])
    url = start(cfg)
    serve.run(build(single), name="batch1", route_prefix="/batch1")
    photo = sample_photos(1)[0][1].resize((96, 64))
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    data = buf.getvalue()

    # the same pipeline in this process, with the application's settings
    t, e = cfg.think, cfg.edit
    direct = AesFormer.load(models["thinker"], models["editor"], engine="hf",
                            engine_options=dict(max_pixels=t.max_pixels, batch_size=t.max_batch_size),
                            control_area=e.control_area, condition_area=e.condition_area, steps=e.steps,
                            true_cfg_scale=e.true_cfg_scale, negative_prompt=e.negative_prompt,
                            output_area=e.output_area,
                            sampling=dict(temperature=t.temperature, top_p=t.top_p, max_tokens=t.max_tokens))
    direct_lock = threading.Lock()  # one model in this process: calls take turns, as in one replica

    def via_direct(i):
        from PIL import Image

        with direct_lock:
            im = Image.open(io.BytesIO(data)).convert("RGB")
            plan, out = direct.reconstruct(im, seed=0)
            out.save(io.BytesIO(), format="PNG")

    def via_serve(i, route="/v1/reconstruct", prefix=""):
        r = requests.post(url + prefix + route, files={"image": ("p.png", data, "image/png")}, data={"seed": 0},
                          timeout=600)
        r.raise_for_status()

    for _ in range(2):  # warm both paths
        via_direct(0)
        via_serve(0)
        via_serve(0, "/v1/plan", "/batch1")

    result: dict = {"load_average_before": load_before, "requests_per_measurement": args.requests,
                    "reconstruct": {}}
    for c in levels:
        n = max(args.requests, 2 * c)
        if c == 1:
            # interleave the two paths one request at a time: drift in the machine's load hits both alike
            lat = {"serve": [], "direct": []}
            t_wall = {"serve": 0.0, "direct": 0.0}
            for i in range(n):
                for name, fn in (("serve", via_serve), ("direct", via_direct)):
                    t0 = time.perf_counter()
                    fn(i)
                    dt = time.perf_counter() - t0
                    lat[name].append(dt)
                    t_wall[name] += dt
            result["reconstruct"][c] = {k: stats(lat[k], t_wall[k]) for k in lat}
        else:
            result["reconstruct"][c] = {"serve": load(c, n, via_serve), "direct": load(c, n, via_direct)}
    r1 = result["reconstruct"].get(1)
    if r1:
        result["serve_added_p50_ms_c1"] = round(r1["serve"]["p50_ms"] - r1["direct"]["p50_ms"], 1)

    n8 = max(args.requests, 16)
    batched = load(8, n8, lambda i: via_serve(i, "/v1/plan"))
    unbatched = load(8, n8, lambda i: via_serve(i, "/v1/plan", "/batch1"))
    result["thinker_plan_c8"] = {"batched": batched, "max_batch_size_1": unbatched}
    result["thinker_batching_throughput_ratio_c8"] = round(batched["throughput_rps"] / unbatched["throughput_rps"], 2)
    result["load_average_after"] = open("/proc/loadavg").read().split()[:3]
    serve.delete("batch1")
    stop(cfg)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""AesFormer (thinker ▶ editor) and the batch reconstruction job on the tiny models."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aesformer.samples import sample_photo, sample_photos

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def aesformer(tiny_models):
    from aesformer.pipeline import AesFormer

    return AesFormer.load(tiny_models["thinker"], tiny_models["editor"], engine="hf",
                          engine_options={"dtype": "float32", "max_pixels": 16384}, control_area=4096,
                          condition_area=3136, device="cpu", steps=2,
                          sampling=dict(max_tokens=24, temperature=0.6, top_p=0.95))


def test_reconstruct_a_real_photo_returns_a_plan_and_the_requested_size(aesformer):
    plan, image = aesformer.reconstruct(sample_photo("astronaut"), seed=0, height=96, width=128)
    assert isinstance(plan, str) and plan.strip()
    assert image.size == (128, 96) and image.mode == "RGB"
    # a size off the editor's 16-pixel grid is still honoured
    assert aesformer.reconstruct(sample_photo("coffee"), plan="Crop tighter.", height=90, width=120)[1].size == (120, 90)


def test_a_plan_that_does_not_parse_is_used_as_free_text(aesformer, caplog):
    from aesformer.actions import ActionPlan
    from aesformer.pipeline import normalise_plan

    with caplog.at_level("WARNING"):
        plan, _ = aesformer.reconstruct(sample_photo("chelsea"), plan="  make the cat pop  ", height=64, width=96)
    assert plan == "make the cat pop"
    assert "free text" in caplog.text
    good = ActionPlan(*(f"step {i}" for i in range(1, 8))).render()
    assert normalise_plan(good) == (good, True)


def test_bad_photos_are_skipped_with_a_reason_and_huge_ones_downscaled():
    from aesformer.actors.reconstruct import load_photo

    def png(w, h):
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (120, 80, 40)).save(buf, format="PNG")
        return buf.getvalue()

    limits = dict(min_side=32, max_pixels=100 * 100, max_input_pixels=1000 * 1000)
    assert load_photo({"name": "x", "data": b"not an image"}, **limits)["skip"].startswith("does not decode")
    assert load_photo({"name": "x", "data": png(20, 200)}, **limits)["skip"].startswith("tiny")
    assert load_photo({"name": "x", "data": png(1200, 900)}, **limits)["skip"].startswith("huge")
    big = load_photo({"name": "x", "data": png(400, 300)}, **limits)
    assert big["skip"] is None and big["downscaled"] and (big["input_width"], big["input_height"]) == (400, 300)
    w, h = Image.open(io.BytesIO(big["image"])).size
    assert w * h <= 100 * 100 and abs(w / h - 4 / 3) < 0.05


@pytest.fixture(scope="module")
def ray_address():
    from aesformer.cluster import init_ray, shutdown_ray
    from aesformer.config import RayConfig

    ray = init_ray(RayConfig(num_cpus=4, num_gpus=0, ship_code=False))
    yield ray.get_runtime_context().gcs_address
    shutdown_ray()


def _results(out: Path) -> dict:
    return {p.stem: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")} if (out / "results").exists() else {}


def test_job_writes_one_output_per_photo_and_resumes_after_a_kill(ray_address, tiny_models, tmp_path):
    from aesformer.jobs.reconstruct import main

    photos = tmp_path / "photos"
    photos.mkdir()
    for name, photo in sample_photos():
        photo.save(photos / f"{name}.jpg", quality=90)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    Image.new("RGB", (12, 12)).save(photos / "icon.png")
    out = tmp_path / "out"
    argv = ["profile=tiny", f"input={photos}", f"output={out}", "tracking.enabled=false", "editor.steps=12",
            "editor.output_area=12288"]

    # first run in its own driver process, killed after its first finished photo
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "reconstruct.py"), *argv,
                             f"ray.address={ray_address}", "ray.ship_code=false"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            if any(json.loads(p.read_text())["status"] == "ok" for p in (out / "results").glob("*.json")) \
                    if (out / "results").exists() else False:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the first run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    before = _results(out)
    assert 1 <= len(before) < 8

    summary = main(argv)
    after = _results(out)
    assert summary["resumed"] == len(before)
    assert all(after[name] == mtime for name, mtime in before.items())    # finished photos were not redone
    assert len(after) == 8 and summary["ok"] == 6 and summary["skipped"] == 2
    images = sorted((out / "images").glob("*.png"))
    assert [p.stem for p in images] == sorted(n for n, _ in sample_photos())
    assert all(Image.open(p).size[0] * Image.open(p).size[1] <= 12288 * 1.2 for p in images)
    assert len(list((out / "plans").glob("*.txt"))) == 6
    skipped = {json.loads(l)["name"]: json.loads(l)["reason"] for l in (out / "skipped.jsonl").read_text().splitlines()}
    assert skipped["broken"].startswith("does not decode") and skipped["icon"].startswith("tiny")
    sheet = Image.open(summary["contact_sheet"])
    assert sheet.width > 256 and np.asarray(sheet).std() > 0

"""Editor benchmark: seconds per LoRA training step and per reconstructed
image, for the tiny editor and a small one (4 blocks, twice as wide, larger
images), plus the cache hit rate of a second cache run. Prints one JSON line;
the small editor is also given as a ratio to the tiny one measured in the
same run.

    python tests/benchmarks/editor.py [--out DIR] [--steps N] [--images N]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

# runs as a plain script: make the job modules importable like the tests do
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jobs"))

SMALL_TRANSFORMER = dict(num_layers=4, attention_head_dim=32, num_attention_heads=4, axes_dims_rope=(8, 12, 12))
SIZES = {  # target area, control area, vision-language area, output area
    "tiny": dict(target_area=128 * 96, control_area=64 * 64, condition_area=56 * 56),
    "small": dict(target_area=256 * 192, control_area=128 * 128, condition_area=112 * 112),
}


def build_small_editor(tiny_editor: str, folder: Path) -> str:
    """The tiny pipeline with a larger random transformer (same text encoder and VAE)."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    if (folder / "model_index.json").exists():
        return str(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(tiny_editor, tmp)
    base = QwenImageTransformer2DModel.load_config(tiny_editor, subfolder="transformer")
    cfg = {k: v for k, v in base.items() if not k.startswith("_")}
    cfg.update(SMALL_TRANSFORMER)
    torch.manual_seed(0)
    shutil.rmtree(tmp / "transformer")
    QwenImageTransformer2DModel(**cfg).save_pretrained(tmp / "transformer")
    tmp.rename(folder)
    return str(folder)


def train(name: str, editor: str, out: Path, steps: int) -> dict:
    from aesformer.jobs.editor_lora import main

    sizes = SIZES[name]
    res = main(["profile=tiny", f"output={out / name / 'train'}", f"cache.dir={out / name / 'cache'}",
                f"models.editor={editor}", f"max_steps={steps}", "validation.every=0", "tracking.enabled=false",
                "checkpoint_every=0", *(f"{k}={v}" for k, v in sizes.items())])
    return res


def second_cache_run(name: str, editor: str, out: Path, data: str) -> dict:
    from aesformer.config import load_config
    from aesformer.jobs.editor_lora import EditorLoraConfig, build_cache, training_rows

    sizes = SIZES[name]
    cfg = load_config(EditorLoraConfig, "editor_lora",
                      ["profile=tiny", f"cache.dir={out / name / 'cache'}", f"models.editor={editor}",
                       *(f"{k}={v}" for k, v in sizes.items())])
    ids = {r["id"] for r in training_rows(data, "train")}
    return build_cache(cfg, editor, data, ids)[1]


def reconstruct_seconds(thinker: str, editor: str, lora: str, name: str, images: int) -> float:
    from aesformer.pipeline import AesFormer
    from aesformer.samples import sample_photos

    sizes = SIZES[name]
    af = AesFormer.load(thinker, editor, lora=lora, engine="hf",
                        engine_options={"dtype": "float32", "max_pixels": 16384},
                        control_area=sizes["control_area"], condition_area=sizes["condition_area"], device="cpu",
                        steps=8, output_area=sizes["target_area"],
                        sampling=dict(max_tokens=48, temperature=0.6, top_p=0.95))
    photos = [p for _, p in sample_photos()]
    af.reconstruct(photos[0], seed=0)  # warm-up
    t0 = time.perf_counter()
    for i in range(images):
        af.reconstruct(photos[i % len(photos)], seed=i)
    return (time.perf_counter() - t0) / images


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=40, help="training steps per editor")
    ap.add_argument("--images", type=int, default=3, help="reconstructed images per editor")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    torch.set_num_threads(1)
    import ray

    from aesformer.cluster import shutdown_ray, worker_env
    from aesformer.tiny import ensure_tiny_models

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-editor-"))
    models = ensure_tiny_models()
    editors = {"tiny": models["editor"], "small": build_small_editor(models["editor"], out / "small-editor")}
    # the jobs reuse this Ray; worker logs stay out of stdout, which carries the one JSON line
    ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1", runtime_env={"env_vars": worker_env(1)}, logging_level=logging.WARNING)
    result: dict = {"benchmark": "editor", "device": "cpu", "threads": 1}
    try:
        for name, editor in editors.items():
            t0 = time.perf_counter()
            tr = train(name, editor, out, args.steps)
            cache2 = second_cache_run(name, editor, out, tr["data"])
            result[name] = {
                "train_seconds_per_step": round(tr["seconds_per_step"], 4),
                "train_steps": tr["steps"],
                "loss_first10": round(sum(tr["losses"][:10]) / 10, 4),
                "loss_last10": round(sum(tr["losses"][-10:]) / 10, 4),
                "reconstruct_seconds_per_image": round(
                    reconstruct_seconds(models["thinker"], editor, tr["lora"], name, args.images), 4),
                "cache_first_run_encoded": tr["cache"]["encoded"],
                "cache_second_run_hit_rate": cache2["hit_rate"],
                "cache_second_run_encoded": cache2["encoded"],
                "job_wall_seconds": round(time.perf_counter() - t0, 1),
                **SIZES[name],
            }
    finally:
        shutdown_ray()
    result["small_vs_tiny"] = {
        k: round(result["small"][k] / result["tiny"][k], 3)
        for k in ("train_seconds_per_step", "reconstruct_seconds_per_image")
    }
    result["cache_hit_rate"] = min(result[n]["cache_second_run_hit_rate"] for n in editors)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

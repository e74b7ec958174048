"""Reconstruct many photos: AesThinker writes a plan, AesEditor carries it out.

A Ray Data job: photos are loaded (bad ones skipped with their reason, huge
ones downscaled), a thinker actor pool writes a plan for each, an editor actor
pool edits each photo by its plan and writes, per photo,
``images/<name>.png``, ``plans/<name>.txt`` and ``results/<name>.json``
(written last: it marks the photo done). A rerun skips finished photos, so a
killed job resumes where it stopped. ``contact_sheet.png`` shows
input | output with the plan under them; ``skipped.jsonl`` lists the photos
not reconstructed and why.

    python jobs/reconstruct.py input=photos/ output=runs/reconstruct lora=runs/editor_lora/lora
    python jobs/reconstruct.py input=runs/vcmp/pairs output=runs/reconstruct_test   # an AesRecon folder
"""
from __future__ import annotations

if __package__ in (None, ""):
    import _prelude  # noqa: F401  (makes aesformer importable when run as a script)

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from aesformer.cluster import init_ray
from aesformer.config import ConfigError, JobConfig
from aesformer.job import run_job
from aesformer.progress import DETAIL, Progress
from aesformer.tracking import Tracker

log = logging.getLogger("reconstruct")


@dataclass
class ThinkerSettings:
    engine: str = "auto"            # hf | vllm | auto (vllm when CUDA and vllm are present)
    pool: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    batch_size: int = 4
    dtype: str = "bfloat16"
    tensor_parallel: int = 1
    max_pixels: Optional[int] = 1_048_576   # image pixels the thinker sees
    max_tokens: int = 1024
    temperature: float = 0.6        # the released validation sampling
    top_p: float = 0.95
    instruction: Optional[str] = None


@dataclass
class EditorSettings:
    pool: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    batch_size: int = 1
    dtype: str = "bfloat16"
    steps: int = 40
    true_cfg_scale: float = 4.0
    negative_prompt: Optional[str] = " "
    control_area: int = 1024 * 1024
    condition_area: int = 384 * 384
    output_area: int = 1440 * 1088  # about 1440x1088 at the photo's aspect
    height: Optional[int] = None    # a fixed output size instead of output_area
    width: Optional[int] = None
    render: str = "aspect"          # released: every output 1088x1440 with seed 1234, as the released evaluation
    offload: bool = False           # model CPU offload on GPU (the released editor needs it on 48 GB)


@dataclass
class ReconstructConfig(JobConfig):
    output: str = "runs/reconstruct"
    # a folder of photos, or an AesRecon folder (its poor images); None: the sample photos
    input: Optional[str] = None
    split: Optional[str] = None     # AesRecon input: only this split
    lora: Optional[str] = None      # the AesEditor LoRA folder (editor_lora's <output>/lora)
    limit: Optional[int] = None     # at most this many photos
    min_side: int = 32              # photos with a shorter side are skipped
    max_pixels: int = 16_000_000    # larger photos are downscaled to this many pixels
    max_input_pixels: int = 180_000_000  # larger files are not decoded at all (skipped)
    contact_sheet_max: int = 16
    thinker: ThinkerSettings = field(default_factory=ThinkerSettings)
    editor: EditorSettings = field(default_factory=EditorSettings)


def check_inputs(cfg: ReconstructConfig) -> None:
    from aesformer.pipeline import RENDER_MODES

    if cfg.input is not None and not Path(cfg.input).expanduser().exists():
        raise ConfigError(f"input='{cfg.input}' does not exist: pass a photo, a folder of photos or an AesRecon "
                          "folder")
    if cfg.editor.render not in RENDER_MODES:
        raise ConfigError(f"editor.render must be one of {', '.join(RENDER_MODES)}, got '{cfg.editor.render}'")


def list_inputs(cfg: ReconstructConfig) -> list[dict]:
    """[{name, source | data}] of the input photos, in a stable order."""
    from aesformer.data import finished_shards, iter_pairs

    if cfg.input is None:
        from aesformer.samples import sample_photos

        folder = Path(cfg.output) / "inputs"
        folder.mkdir(parents=True, exist_ok=True)
        for name, photo in sample_photos():
            if not (folder / f"{name}.png").exists():
                photo.save(folder / f"{name}.png")
        src = folder
    else:
        src = Path(cfg.input).expanduser()
        if not src.exists():
            check_inputs(cfg)
    if src.is_dir() and finished_shards(src):
        items = [{"name": _safe(r["id"]), "source": None, "data": r["poor_image"]}
                 for r in iter_pairs(src, ["id", "poor_image"], split=cfg.split)]
    else:
        files = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
        items, seen = [], set()
        for p in files:
            name = _safe(p.stem)
            if name in seen:
                name = _safe(p.name)
            seen.add(name)
            items.append({"name": name, "source": str(p.resolve()), "data": None})
    return items[: cfg.limit] if cfg.limit else items


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)) or "photo"


def finished(out: Path) -> dict[str, dict]:
    """The result records already written (a photo with one is done)."""
    done = {}
    for p in (out / "results").glob("*.json"):
        try:
            rec = json.loads(p.read_text())
            done[rec["name"]] = rec
        except (OSError, ValueError, KeyError):
            continue  # a torn record: the photo is redone
    return done


def write_contact_sheet(items: list[dict], done: dict[str, dict], path: Path, max_rows: int) -> Optional[Path]:
    """input | output, the plan under them, for the first ``max_rows`` finished photos."""
    import io

    from PIL import Image

    from aesformer.data import contact_sheet, encode_image

    rows = []
    for it in items:
        if len(rows) >= max_rows:
            break
        rec = done.get(it["name"])
        if rec is None or rec.get("status") != "ok":
            continue
        raw = it["data"] if it["data"] is not None else Path(it["source"]).read_bytes()
        photo = Image.open(io.BytesIO(raw)).convert("RGB")
        photo.thumbnail((512, 512))  # the sheet shows thumbnails; do not carry a huge input around
        rows.append({"id": it["name"], "poor_image": encode_image(photo, "png"),
                     "good_image": Path(rec["image"]).read_bytes(), "plan": rec["plan"]})
    return contact_sheet(rows, path, max_pairs=max_rows, labels=("input", "output")) if rows else None


def check_cluster(cfg: ReconstructConfig, ray) -> None:
    """The thinker and editor pools fit the cluster; on several nodes the
    output (the editor actors write the images) is a folder every node sees
    and every node has the models."""
    from aesformer.models import require_models_on_nodes, resolve_model
    from aesformer.placement import PoolAsk, check_pools
    from aesformer.storage import check_across_nodes

    th, ed = cfg.thinker, cfg.editor
    check_pools(ray, [PoolAsk("thinker", th.pool, {"CPU": th.num_cpus, "GPU": th.num_gpus * th.tensor_parallel}),
                      PoolAsk("editor", ed.pool, {"CPU": ed.num_cpus, "GPU": ed.num_gpus})], "reconstruct")
    check_across_nodes(cfg, ray)
    require_models_on_nodes(ray, {key: resolve_model(name, cfg.models.cache_dir, key) for key, name in
                                  (("models.thinker", cfg.models.thinker), ("models.editor", cfg.models.editor))})


def run(cfg: ReconstructConfig) -> dict:
    """Reconstructs every input photo not yet done; returns counts and paths."""
    import ray
    from ray.data import ActorPoolStrategy

    from aesformer.actors.reconstruct import EditorPool, ThinkerPool, load_photo
    from aesformer.models import resolve_model
    from aesformer.pipeline import render_settings
    from aesformer.stages import model_stage, stage_errors

    out = Path(cfg.output)
    check_cluster(cfg, init_ray(cfg.ray))  # before any model loads or the tracker starts
    with Tracker.start(cfg, "reconstruct") as tracker:
        items = list_inputs(cfg)
        done_before = finished(out)
        todo = [it for it in items if it["name"] not in done_before]
        log.info("%d photos: %d done earlier, %d to reconstruct", len(items), len(items) - len(todo), len(todo))
        t0 = time.perf_counter()
        new: list[dict] = []
        if todo:
            thinker_path = resolve_model(cfg.models.thinker, cfg.models.cache_dir, "models.thinker")
            editor_path = resolve_model(cfg.models.editor, cfg.models.cache_dir, "models.editor")
            th, ed = cfg.thinker, cfg.editor
            render = render_settings(ed.render, seed=cfg.seed, height=ed.height, width=ed.width)
            engine_options = dict(dtype=th.dtype if th.num_gpus else "float32", max_pixels=th.max_pixels,
                                  batch_size=th.batch_size)
            if th.engine != "hf" and th.num_gpus:
                engine_options = dict(dtype=th.dtype, max_pixels=th.max_pixels, tensor_parallel_size=th.tensor_parallel,
                                      seed=cfg.seed)
            dataset = ray.data.from_items(todo, override_num_blocks=min(len(todo), 64))
            dataset = dataset.map(load_photo, fn_kwargs=dict(min_side=cfg.min_side, max_pixels=cfg.max_pixels,
                                                   max_input_pixels=cfg.max_input_pixels))
            dataset = model_stage(
                dataset, "thinker", ThinkerPool, cfg.ray, batch_format="pyarrow", batch_size=th.batch_size,
                compute=ActorPoolStrategy(size=th.pool), num_gpus=th.num_gpus * th.tensor_parallel, num_cpus=th.num_cpus,
                fn_constructor_kwargs=dict(model_path=thinker_path, engine=th.engine, engine_options=engine_options,
                                           sampling=dict(temperature=th.temperature, top_p=th.top_p,
                                                         max_tokens=th.max_tokens),
                                           instruction=th.instruction, seed=cfg.seed))
            dataset = model_stage(
                dataset, "editor", EditorPool, cfg.ray, batch_format="pyarrow", batch_size=ed.batch_size,
                compute=ActorPoolStrategy(size=ed.pool), num_gpus=ed.num_gpus, num_cpus=ed.num_cpus,
                fn_constructor_kwargs=dict(editor_path=editor_path, out_dir=str(out), lora=cfg.lora,
                                           control_area=ed.control_area, condition_area=ed.condition_area,
                                           output_area=ed.output_area, steps=ed.steps, true_cfg_scale=ed.true_cfg_scale,
                                           negative_prompt=ed.negative_prompt,
                                           dtype=ed.dtype if ed.num_gpus else "float32",
                                           device="cuda" if ed.num_gpus else "cpu", seed=render["seed"],
                                           height=render["height"], width=render["width"], editor_name=cfg.models.editor,
                                           offload=ed.offload))
            with Progress("reconstruct", len(todo), "photos") as photos, stage_errors(cfg.ray):
                for rec in dataset.iter_rows():
                    new.append(rec)
                    status = rec["status"] if rec["status"] == "ok" else f"{rec['status']} ({rec['reason']})"
                    log.info("[%d/%d] %s: %s", len(new), len(todo), rec["name"], status, extra=DETAIL)
                    photos.update(1)
        seconds = time.perf_counter() - t0
        done = finished(out)
        skipped = [r for r in done.values() if r["status"] == "skipped"]
        with open(out / "skipped.jsonl", "w") as f:
            for r in sorted(skipped, key=lambda r: r["name"]):
                f.write(json.dumps({"name": r["name"], "reason": r["reason"]}) + "\n")
        sheet = write_contact_sheet(items, done, out / "contact_sheet.png", cfg.contact_sheet_max)
        ok = [r for r in done.values() if r["status"] == "ok"]
        made = [r for r in new if r["status"] == "ok"]
        summary = {
            "output": str(out), "photos": len(items), "resumed": len(items) - len(todo), "reconstructed": len(made),
            "ok": len(ok), "skipped": len(skipped), "contact_sheet": str(sheet) if sheet else None,
            "images": sorted(r["image"] for r in ok), "seconds": seconds,
            "seconds_per_image": seconds / len(made) if made else None,
            "unparsed_plans": sum(1 for r in made if not r["plan_parsed"]),
        }
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None})
        if sheet:
            tracker.log_artifact(sheet)
    log.info("reconstructed %d photos (%d skipped, %d done earlier) into %s", len(made), len(skipped),
             summary["resumed"], out)
    return summary


def main(argv=None) -> dict:
    return run_job(ReconstructConfig, "reconstruct", run, argv, check=check_inputs)


if __name__ == "__main__":
    main()

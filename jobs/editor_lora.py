"""Stage 2: fine-tune the editor (AesEditor) with LoRA on (poor, good, plan) pairs.

1. Cache: a Ray Data actor pool encodes every pair once with the pipeline's
   own methods: VAE latents of the good image (its aspect bucket) and of the
   poor image (the control, at the control area), and the text condition of
   the plan with the poor image in it. Shards are keyed by content hash under
   a folder named by the encoder settings, so reruns encode nothing.
2. Train: a TorchTrainer whose workers load only the transformer, add LoRA
   (rank 16, alpha 1 on every linear layer of the blocks) and learn the
   flow-matching velocity (:mod:`aesformer.flow_matching`) on batches of one aspect
   bucket; checkpoints every N steps and ``resume=auto``; MLflow gets loss
   (also per timestep bucket), lr, step time and, every N steps, a grid
   poor | edited | good of fixed validation pairs from a renderer actor.
3. Export: the LoRA in diffusers format (``pipe.load_lora_weights`` reads
   it) with a model card, in ``<output>/lora``.

    python jobs/editor_lora.py data=runs/distill/pairs output=runs/editor_lora
    python jobs/editor_lora.py profile=tiny output=runs/editor_lora     # builds its own small data
"""
from __future__ import annotations

if __package__ in (None, ""):
    import _prelude  # noqa: F401  (makes aesformer importable when run as a script)

import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from aesformer.cluster import init_ray, use_worker_threads
from aesformer import checkpoints, progress, storage
from aesformer.progress import RemoteProgress
from aesformer.config import JobConfig, parse_workers
from aesformer.data import find_dataset, no_plans_error
from aesformer.editor import DEFAULT_LORA_TARGETS, TARGET_ASPECTS
from aesformer.editor_cache import CacheReader, collate, epoch_batches
from aesformer.job import run_job
from aesformer.storage import check_across_nodes
from aesformer.synth import sample_aesrecon
from aesformer.tracking import Tracker

log = logging.getLogger("editor_lora")


@dataclass
class CacheSettings:
    # None: <models.cache_dir>/editor_cache (shared by runs; one sub-folder per encoder
    # settings) on one node; <output>/editor_cache on a cluster of several nodes, where the
    # encoders and the training workers are on different disks. A folder or a URI.
    dir: Optional[str] = None
    pool_size: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    batch_size: int = 4
    dtype: str = "float32"
    offload: bool = False   # model CPU offload on GPU (the released editor + text encoder exceed 48 GB)


@dataclass
class LoraSettings:
    rank: int = 16
    alpha: float = 1.0
    targets: list = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))


@dataclass
class ValidationSettings:
    pairs: int = 2          # fixed validation pairs (the test split's first ids, else the training data's)
    every: int = 200        # render a grid every N steps (and at the end); 0: only at the end
    steps: int = 40
    true_cfg_scale: float = 4.0
    negative_prompt: Optional[str] = " "
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    offload: bool = False


@dataclass
class EditorLoraConfig(JobConfig):
    output: str = "runs/editor_lora"
    # AesRecon folder with plans; None builds a small one from the sample photos
    data: Optional[str] = None
    split: Optional[str] = "train"
    sample_pairs: int = 12
    sample_size: int = 256           # longest side of the sample photos before framing
    # sizes (pixels): target bucket area, control (VAE) area, vision-language copy area
    target_area: int = 1080 * 1440
    control_area: int = 1024 * 1024
    condition_area: int = 384 * 384
    aspects: list = field(default_factory=lambda: [round(a, 6) for a in TARGET_ASPECTS])
    # optimisation (released: lr 1e-5, 8-bit AdamW with its default weight decay 1e-2, 2 epochs, seed 42)
    lr: float = 1e-5
    optimizer: str = "auto"          # auto: adamw8bit on GPU, adamw on CPU
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    warmup_steps: int = 0
    epochs: int = 2
    max_steps: Optional[int] = None
    batch_size: int = 1
    gradient_checkpointing: bool = True
    dtype: str = "bfloat16"          # transformer weights on the workers (LoRA weights stay fp32)
    use_gpu: bool = False
    # an int, or [min, max] for elastic training
    num_workers: Any = 1
    max_failures: int = 2
    resume: str = "auto"             # auto | never | <checkpoint folder>
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    # write the ids each worker trained on per step to <output>/sample_log/rank<r>.jsonl
    sample_log: bool = False
    cache: CacheSettings = field(default_factory=CacheSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)


# ---------------------------------------------------------------------------
# Data: the pairs with a plan
# ---------------------------------------------------------------------------
def training_rows(data: str, split: Optional[str]) -> list[dict]:
    """(id, plan) of the rows that have a plan; plans that do not parse are kept as free text."""
    from aesformer.data import iter_pairs
    from aesformer.pipeline import normalise_plan

    rows = []
    for r in iter_pairs(data, columns=["id", "plan", "split"]):
        if split is not None and r.get("split") not in (split, None):
            continue
        if not r.get("plan"):
            continue
        rows.append({"id": r["id"], "plan": normalise_plan(r["plan"])[0]})
    return rows


# ---------------------------------------------------------------------------
# 1. Cache
# ---------------------------------------------------------------------------
# pairs to encode up to this many image bytes go from the driver's own read to
# the encoders (Ray Data's Parquet reader starts tasks of its own)
HAND_OVER_BYTES = 64 << 20


def build_cache(cfg: EditorLoraConfig, editor_path: str, data: str, ids: set[str],
                nodes: int = 1) -> tuple[dict, dict, dict]:
    """Encode the pairs in ``ids`` that the cache lacks. Returns ({id: cache
    entry}, stats {pairs, hits, encoded, hit_rate}, the cache folder's settings)."""
    from ray.data import ActorPoolStrategy

    from aesformer.actors.editor_actors import CacheEncoder
    from aesformer.editor_cache import cache_index, content_key, encoder_settings, settings_folder, with_keys
    from aesformer.data import PAIR_SCHEMA, iter_pairs, read_ray
    from aesformer.pipeline import normalise_plan
    from aesformer.stages import model_stage, stage_errors

    settings = encoder_settings(editor_path, dtype=cfg.cache.dtype, control_area=cfg.control_area,
                                condition_area=cfg.condition_area, target_area=cfg.target_area,
                                aspects=cfg.aspects)
    cache_dir = cfg.cache.dir or (storage.join(cfg.output, "editor_cache") if nodes > 1
                                  else str(Path(cfg.models.cache_dir).expanduser() / "editor_cache"))
    folder = settings_folder(cache_dir, settings)
    cols = ["id", "poor_image", "good_image", "plan"]
    # content keys: one streaming pass over the pairs (hashing is cheap next to encoding);
    # the pairs to encode are kept from it while they are few, else Ray Data reads them again
    index = cache_index(folder)
    id_keys, kept, kept_bytes = {}, [], 0
    for r in iter_pairs(data, cols):
        if r["id"] in ids:
            id_keys[r["id"]] = key = content_key(r["poor_image"], r["good_image"], normalise_plan(r["plan"] or "")[0])
            if key not in index and kept is not None:
                kept.append(r)
                kept_bytes += len(r["poor_image"] or b"") + len(r["good_image"] or b"")
                kept = kept if kept_bytes <= HAND_OVER_BYTES else None
    missing = {i for i, k in id_keys.items() if k not in index}
    encoded = 0
    if missing:
        import pyarrow as pa
        import ray.data

        log.info("cache: encoding %d of %d pairs into %s", len(missing), len(id_keys), folder)
        pairs = (ray.data.from_arrow(pa.Table.from_pylist(kept, schema=pa.schema([PAIR_SCHEMA.field(c) for c in cols])))
                 if kept is not None else read_ray(data, columns=cols).filter(lambda r: r["id"] in missing))
        todo = pairs.map_batches(with_keys, batch_format="pyarrow", batch_size=16)
        out = model_stage(
            todo, "cache", CacheEncoder, cfg.ray, batch_format="pyarrow", batch_size=cfg.cache.batch_size,
            compute=ActorPoolStrategy(size=cfg.cache.pool_size),
            num_gpus=cfg.cache.num_gpus, num_cpus=cfg.cache.num_cpus,
            fn_constructor_kwargs=dict(editor_path=editor_path, cache_folder=str(folder),
                                       control_area=cfg.control_area, condition_area=cfg.condition_area,
                                       target_area=cfg.target_area, aspects=cfg.aspects, dtype=cfg.cache.dtype,
                                       device="cuda" if cfg.cache.num_gpus else "cpu",
                                       editor_name=cfg.models.editor, offload=cfg.cache.offload))
        with stage_errors(cfg.ray):
            encoded = sum(r["encoded"] for r in out.select_columns(["encoded"]).iter_rows())
        index = cache_index(folder)
    entries = {i: index[k] for i, k in id_keys.items() if k in index}
    stats = {"pairs": len(id_keys), "hits": len(id_keys) - len(missing), "encoded": encoded,
             "hit_rate": (len(id_keys) - len(missing)) / max(1, len(id_keys)), "folder": str(folder)}
    log.info("cache: %d pairs, %d hits, %d encoded", stats["pairs"], stats["hits"], encoded)
    return entries, stats, settings


# ---------------------------------------------------------------------------
# 2. Training
# ---------------------------------------------------------------------------
def _make_optimizer(name: str, params, lr: float, weight_decay: float, on_gpu: bool):
    import torch

    if name == "auto":
        name = "adamw8bit" if on_gpu else "adamw"
    if name == "adamw8bit":
        import bitsandbytes as bnb  # GPU only: the 8-bit AdamW of the released training

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{name}' (auto, adamw, adamw8bit)")


def train_loop(config: dict) -> None:
    """One Ray Train worker: the transformer only, LoRA, flow matching."""

    import ray.train
    import ray.train.torch
    import torch
    from diffusers import QwenImageTransformer2DModel
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from aesformer import flow_matching
    from aesformer.editor import lora_config, resolve_dtype, save_lora, transformer_forward
    from aesformer.tracking import Tracker

    use_worker_threads()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    dtype = resolve_dtype(config["dtype"]) if on_gpu else torch.float32
    torch.manual_seed(config["seed"])

    transformer = QwenImageTransformer2DModel.from_pretrained(config["editor"], subfolder="transformer",
                                                              torch_dtype=dtype)
    transformer.requires_grad_(False)
    lcfg = config["lora"]
    transformer.add_adapter(lora_config(lcfg["rank"], lcfg["alpha"], tuple(lcfg["targets"])))
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # LoRA weights and their optimizer state in fp32
    if config["gradient_checkpointing"]:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    # DDP: the last block's text-stream MLP and output projection feed nothing
    # (only image tokens reach the output), so their LoRA weights get no gradient
    model = (ray.train.torch.prepare_model(transformer, parallel_strategy_kwargs={"find_unused_parameters": True})
             if world > 1 else transformer.to(device))
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = _make_optimizer(config["optimizer"], params, config["lr"], config["weight_decay"], on_gpu)

    state = {"step": 0, "epoch": 0, "batch": 0, "losses": [], "step_seconds": 0.0}
    ckpt = ray.train.get_checkpoint()
    resume_dir = None
    if ckpt is not None:
        resume_dir = ckpt.to_directory()
    elif config.get("resume_from"):
        resume_dir = config["resume_from"]
        if storage.is_uri(resume_dir):  # this node's copy of a checkpoint at a URI
            resume_dir = str(storage.download(resume_dir, Path(tempfile.mkdtemp(prefix="editor-resume-")) / "c"))
    if resume_dir:
        from safetensors.torch import load_file

        from aesformer.editor import LORA_WEIGHTS_FILE

        lora_state = load_file(str(Path(resume_dir) / "lora" / LORA_WEIGHTS_FILE))
        lora_state = {k.removeprefix("transformer."): v for k, v in lora_state.items()}
        set_peft_model_state_dict(transformer, lora_state)
        opt.load_state_dict(torch.load(Path(resume_dir) / "optimizer.pt", map_location=device))
        state = checkpoints.read_state(resume_dir)
        if rank == 0:
            log.info("resumed from %s at step %d", resume_dir, state["step"])

    entries = config["entries"]
    layout0 = epoch_batches(entries, config["batch_size"], config["seed"], 0, world)
    steps_per_epoch = len(layout0[0])
    if steps_per_epoch == 0:
        raise ValueError(f"no training batches: {len(entries)} pairs for {world} workers")
    total = config["max_steps"] or steps_per_epoch * config["epochs"]
    reader = CacheReader()
    tracker = Tracker.attach(**config["tracking"]) if (rank == 0 and config.get("tracking")) else None
    renderer = config.get("renderer")
    pending = None
    sample_log = None
    if config.get("sample_log"):
        sample_log = storage.Appender(storage.join(config["output"], "sample_log", f"rank{rank}.jsonl"))

    def lr_at(step: int) -> float:
        w = config["warmup_steps"]
        return config["lr"] * min(1.0, (step + 1) / w) if w else config["lr"]

    def lora_cpu() -> dict:
        return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(transformer).items()}

    def save_checkpoint() -> None:
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                save_lora(transformer, Path(d) / "lora", base_model=config["editor_name"])
                torch.save(opt.state_dict(), Path(d) / "optimizer.pt")
                checkpoints.write_state(d, state)
            ray.train.report({"step": state["step"], "loss": state["losses"][-1] if state["losses"] else None},
                             checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)
            checkpoints.wait_until_taken()  # a node lost from now on restarts the group from here

    t_start = time.perf_counter()
    done_at_start = state["step"]
    while state["step"] < total:
        batches = epoch_batches(entries, config["batch_size"], config["seed"], state["epoch"], world)[rank]
        while state["batch"] < len(batches) and state["step"] < total:
            t0 = time.perf_counter()
            step = state["step"]
            target, control, prompt, mask = collate([reader.tensors(e) for e in batches[state["batch"]]])
            e0 = batches[state["batch"]][0]
            th, tw, ch, cw = e0["target_h"], e0["target_w"], e0["control_h"], e0["control_w"]
            g = torch.Generator().manual_seed(config["seed"] * 1_000_003 + step * world + rank)
            t = flow_matching.sample_timesteps(target.shape[0], th, tw, generator=g)
            noise = torch.randn(target.shape, generator=g, dtype=target.dtype)
            x0, t, noise = target.to(device), t.to(device), noise.to(device)
            xt = flow_matching.noisy_latent(x0, noise, t)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            with torch.autocast(device.type, dtype=dtype, enabled=on_gpu and dtype != torch.float32):
                pred = transformer_forward(model, xt.to(dtype), control.to(device, dtype), (th // 8, tw // 8),
                                           (ch // 8, cw // 8), prompt.to(device, dtype),
                                           None if mask is None else mask.to(device), t)
            per_sample = flow_matching.flow_loss(pred, flow_matching.velocity_target(x0, noise), reduction="none")
            loss = per_sample.mean()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config["grad_clip"]) if config["grad_clip"] else None
            opt.step()
            opt.zero_grad(set_to_none=True)
            value = loss.detach()
            if world > 1:
                torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.AVG)
            state["losses"].append(float(value))
            state["step"] += 1
            if sample_log is not None:
                sample_log.write({"step": state["step"], "rank": rank, "ids": [e["id"] for e in batches[state["batch"]]]})
            state["batch"] += 1
            dt = time.perf_counter() - t0
            state["step_seconds"] = state.get("step_seconds", 0.0) + dt
            if tracker is not None:
                metrics = {"loss": float(value), "lr": lr_at(step), "step_time": dt, "epoch": state["epoch"]}
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                for ti, li in zip(t.tolist(), per_sample.tolist()):
                    metrics[f"loss/{flow_matching.timestep_bucket(ti)}"] = li
                tracker.log_metrics(metrics, step=state["step"])
            if rank == 0:
                progress.report(config.get("progress"), state["step"], total, f"loss {float(value):.4f}")
            if rank == 0 and (state["step"] % config["log_every"] == 0 or state["step"] == total):
                rate = (time.perf_counter() - t_start) / max(1, state["step"] - done_at_start)
                log.info("step %d/%d loss %.4f %.2fs/step eta %.0fs", state["step"], total, float(value), dt,
                         rate * (total - state["step"]))
            if rank == 0 and renderer is not None and config["val_every"] and state["step"] % config["val_every"] == 0:
                import ray as _ray

                # one render at a time: skip this one if the last is still running
                if pending is None or _ray.wait([pending], timeout=0)[0]:
                    pending = renderer.render.remote(lora_cpu(), state["step"])
            if config["checkpoint_every"] and state["step"] % config["checkpoint_every"] == 0 and state["step"] < total:
                save_checkpoint()
        if state["batch"] >= len(batches):
            state["epoch"] += 1
            state["batch"] = 0
    # the final weights: a checkpoint with the export, and the final validation render
    if rank == 0 and renderer is not None:
        import ray as _ray

        _ray.get(renderer.render.remote(lora_cpu(), state["step"], "final"))
    save_checkpoint()


def model_card(cfg: EditorLoraConfig, stats: dict, n_pairs: int, steps: int, losses: list) -> str:
    first = sum(losses[:10]) / max(1, len(losses[:10]))
    last = sum(losses[-10:]) / max(1, len(losses[-10:]))
    return f"""---
base_model: {cfg.models.editor}
library_name: diffusers
tags: [aesformer, aeseditor, lora, qwen-image-edit, image-editing]
---
# AesEditor LoRA

LoRA for `{cfg.models.editor}` that carries out seven-dimension photo
reconstruction plans (AesFormer stage 2). Load it with
`QwenImageEditPlusPipeline.load_lora_weights(<this folder>)`.

- Data: {cfg.data or 'sample photos with synthetic poor framings'} ({n_pairs} pairs with plans, split {cfg.split})
- LoRA: rank {cfg.lora.rank}, alpha {cfg.lora.alpha} on {', '.join(cfg.lora.targets)} (in every transformer block; top-level names once)
- Training: {steps} steps, {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr}, optimizer {cfg.optimizer},
  seed {cfg.seed}, flow matching with qwen_shift timesteps
- Sizes: target about {cfg.target_area} px (aspect buckets), control {cfg.control_area} px,
  vision-language copy {cfg.condition_area} px
- Loss: first 10 steps {first:.4f}, last 10 steps {last:.4f}
- Inference: {cfg.validation.steps} steps, true CFG {cfg.validation.true_cfg_scale}, negative prompt {cfg.validation.negative_prompt!r}
"""


def validation_pairs(cfg: EditorLoraConfig, data: str, rows: list[dict]) -> list[dict]:
    """The fixed validation pairs: the test split's first ids, else the training
    data's; each with its target bucket size (the size of the edited image)."""
    from aesformer.data import decode_image, iter_pairs
    from aesformer.editor import bucket_size
    from aesformer.pipeline import normalise_plan

    n = cfg.validation.pairs
    ids = sorted(r["id"] for r in iter_pairs(data, ["id", "plan", "split"]) if r.get("plan") and r.get("split") == "test")
    ids = set((ids or sorted(r["id"] for r in rows))[:n])
    pairs = []
    for r in iter_pairs(data, ["id", "poor_image", "good_image", "plan"]):
        if r["id"] in ids:
            good = decode_image(r["good_image"])
            w, h = bucket_size(good.width, good.height, cfg.target_area, cfg.aspects)
            # the plan as training saw it (canonical rendering), so the grids show what was learned
            pairs.append({"id": r["id"], "poor_image": r["poor_image"], "good_image": r["good_image"],
                          "plan": normalise_plan(r["plan"] or "")[0], "width": w, "height": h})
    return sorted(pairs, key=lambda p: p["id"])


def check_inputs(cfg: EditorLoraConfig) -> None:
    if cfg.data is not None:
        cfg.data = str(find_dataset(cfg.data))
    checkpoints.check_resume(cfg.resume)
    parse_workers(cfg.num_workers)


def run(cfg: EditorLoraConfig) -> dict:
    """Cache, train, export; returns the LoRA path, the loss history and the cache stats."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from aesformer.actors.editor_actors import ValidationRenderer
    from aesformer.models import resolve_model

    out = cfg.output  # a folder every node sees, or a URI (s3://...)
    with Tracker.start(cfg, "editor_lora") as tracker:
        with tracker.phase("ray_init"):
            nodes = check_across_nodes(cfg, init_ray(cfg.ray))  # output shared by every node, no SQLite across nodes
        editor_path = resolve_model(cfg.models.editor, cfg.models.cache_dir, "models.editor")
        data = str(find_dataset(cfg.data)) if cfg.data is not None else None
        if data is None:
            with tracker.phase("sample_data"):
                data = str(sample_aesrecon(storage.join(out, "sample_pairs"), cfg.sample_pairs, cfg.seed, side=cfg.sample_size, job="editor_lora"))
        rows = training_rows(data, cfg.split)
        if not rows:
            raise no_plans_error(data, "data", cfg.split)

        # 1. cache
        with tracker.phase("cache"):
            entries, stats, _ = build_cache(cfg, editor_path, data, {r["id"] for r in rows}, nodes)
        tracker.log_metrics({"cache/hit_rate": stats["hit_rate"], "cache/encoded": stats["encoded"]})
        train_entries = [entries[r["id"]] for r in rows if r["id"] in entries]

        val_pairs = validation_pairs(cfg, data, rows)
        tracking = {"uri": tracker.uri, "run_id": tracker.run_id} if tracker.enabled else None
        lora = asdict(cfg.lora)
        renderer = None
        if val_pairs:
            # restarted (on another node) if its node is lost, and a render in flight sent again:
            # the final render, which the training waits for, must not fail the run
            renderer = ray.remote(ValidationRenderer).options(
                num_cpus=cfg.validation.num_cpus, num_gpus=cfg.validation.num_gpus, max_restarts=2,
                max_task_retries=2).remote(
                editor_path, storage.join(out, "validation"), val_pairs, control_area=cfg.control_area,
                condition_area=cfg.condition_area, lora=lora, steps=cfg.validation.steps,
                true_cfg_scale=cfg.validation.true_cfg_scale, negative_prompt=cfg.validation.negative_prompt,
                seed=cfg.seed, device="cuda" if cfg.validation.num_gpus else "cpu", tracking=tracking,
                editor_name=cfg.models.editor, offload=cfg.validation.offload,
                dtype=cfg.dtype if cfg.validation.num_gpus else "float32")

        # 2. train
        ckpt_root = storage.join(out, "checkpoints")
        ray_store, reported = storage.ray_train_storage(ckpt_root)
        found = checkpoints.resolve_resume(cfg.resume, ckpt_root, "*/checkpoint_*")
        resume_from = str(found[0]) if found else None
        if resume_from:
            log.info("resuming from %s", resume_from)
        steps = RemoteProgress("editor_lora", unit="steps")
        loop_config = dict(
            editor=editor_path, editor_name=cfg.models.editor, entries=train_entries, lora=lora,
            seed=cfg.seed, lr=cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
            warmup_steps=cfg.warmup_steps, epochs=cfg.epochs, max_steps=cfg.max_steps, batch_size=cfg.batch_size,
            gradient_checkpointing=cfg.gradient_checkpointing, dtype=cfg.dtype, checkpoint_every=cfg.checkpoint_every,
            log_every=cfg.log_every, val_every=cfg.validation.every, renderer=renderer, tracking=tracking,
            resume_from=resume_from, progress=steps.queue, output=out, sample_log=cfg.sample_log,
        )
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=parse_workers(cfg.num_workers), use_gpu=cfg.use_gpu),
            run_config=RunConfig(
                name=f"train-{time.strftime('%Y%m%d-%H%M%S')}", **ray_store,
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                failure_config=FailureConfig(max_failures=cfg.max_failures)),
        )
        with tracker.phase("train"), steps:
            result = trainer.fit()
        log.info("phase seconds: %s", {k: round(v, 1) for k, v in tracker.timings.items()})
        if result.checkpoint is None:
            raise RuntimeError(f"training ended without a checkpoint (error: {result.error})")

        # 3. export
        lora_dir = storage.join(out, "lora")
        with result.checkpoint.as_directory() as d:
            state = checkpoints.read_state(d)
            losses = state["losses"]

            def export(tmp: Path) -> None:
                shutil.copytree(Path(d) / "lora", tmp, dirs_exist_ok=True)
                (tmp / "README.md").write_text(model_card(cfg, stats, len(train_entries), state["step"], losses))

            storage.write_dir(lora_dir, export)
        storage.write_text(storage.join(out, "losses.json"), json.dumps(losses))
        tracker.log_artifact(lora_dir, "lora")
        summary = {"lora": str(lora_dir), "steps": state["step"], "losses": losses, "cache": stats,
                   "seconds_per_step": state.get("step_seconds", 0.0) / max(1, state["step"]),
                   "validation": storage.join(out, "validation"), "data": data,
                   "checkpoint": reported(result.checkpoint.path),
                   "val_pairs": [{k: p[k] for k in ("id", "width", "height")} for p in val_pairs]}
        if renderer is not None:
            ray.kill(renderer)
    log.info("exported the LoRA to %s after %d steps (loss %.4f → %.4f)", lora_dir, state["step"],
             sum(losses[:10]) / max(1, len(losses[:10])), sum(losses[-10:]) / max(1, len(losses[-10:])))
    return summary


def main(argv=None) -> dict:
    return run_job(EditorLoraConfig, "editor_lora", run, argv, check=check_inputs)


if __name__ == "__main__":
    main()

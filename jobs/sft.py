"""Stage 1(a): supervised fine-tuning of AesThinker to write seven-dimension plans.

Reads the AesRecon pairs that distillation gave a plan, streams them through
Ray Data into a Ray Train ``TorchTrainer`` whose workers run DeepSpeed (ZeRO
stage and bf16 from config; NCCL on GPU, gloo on CPU), and trains the base
VLM (``models.thinker``) with the 14 plan tags added to its vocabulary, LoRA
on every linear layer of its language model, the vision tower frozen, and
the token embeddings and lm_head trained in full. Each sample is
``(poor photo, instruction) → plan`` in the model's own chat template, with
the loss on the plan tokens only.

Checkpoints (DeepSpeed state, data position, adapter) land every
``checkpoint_every`` steps and at the end under ``<output>/ray/<run>/``;
``resume=auto`` continues from the newest, a failed worker restarts the
group from it. At the end the adapter is merged into the base model and both
are exported in the Hugging Face layout under ``<output>/export/`` — the
``merged`` folder is the starting policy of GRPO-A.

    python jobs/sft.py data=runs/distill/pairs output=runs/sft
    python jobs/sft.py data=... profile=a40 num_workers=[4,8]    # elastic
"""
from __future__ import annotations

if __package__ in (None, ""):
    import _prelude  # noqa: F401  (makes aesformer importable when run as a script)

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pyarrow.compute as pc

from aesformer.cluster import init_ray
from aesformer import checkpoints, progress, storage
from aesformer.progress import RemoteProgress
from aesformer.config import ConfigError, JobConfig, parse_workers
from aesformer.data import no_plans_error
from aesformer.job import run_job
from aesformer.storage import check_across_nodes
from aesformer.tracking import Tracker

log = logging.getLogger("sft")


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # trained in full so the new tag tokens get real embeddings and logits
    full_modules: list[str] = field(default_factory=lambda: ["embed_tokens", "lm_head"])


@dataclass
class DeepSpeedSettings:
    zero_stage: int = 3
    bf16: bool = True
    gradient_checkpointing: bool = False


@dataclass
class SFTConfig(JobConfig):
    output: str = "runs/sft"
    # an AesRecon Parquet folder whose rows carry plans (the distillation output)
    data: Optional[str] = None
    # train on this split only (null: every row with a layout)
    split: Optional[str] = "train"
    # the thinker's instruction; null: aesformer.actions.THINKER_INSTRUCTION
    instruction: Optional[str] = None
    # training workers: a number, or [min, max] for elastic training
    num_workers: Any = 2
    # null: use GPUs when the cluster has them
    use_gpu: Optional[bool] = None
    cpus_per_worker: float = 1.0
    # optimisation (paper defaults)
    lr: float = 1.0e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    epochs: int = 2
    schedule: str = "cosine"
    warmup_ratio: float = 0.1
    micro_batch: int = 2
    grad_accum: int = 8
    # prompt + plan tokens kept per sample; image pixels (w*h) at most
    cutoff: int = 2048
    max_image_pixels: int = 1048576
    # rows each worker shuffles within (0: keep the stream's order)
    shuffle_buffer: int = 256
    # read the pairs once into Ray's object store and replay them every epoch
    # (small data sets); otherwise every epoch streams from the Parquet again
    cache_data: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    # checkpoints: every N optimizer steps and at the end, the newest K kept
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    # auto: continue from the newest checkpoint under output; never: start
    # afresh (a new run folder); or the path of a checkpoint folder
    resume: str = "auto"
    # worker-group restarts from the last checkpoint before the job fails
    max_failures: int = 2
    # stop after this many optimizer steps (the schedule still spans every epoch)
    max_steps: Optional[int] = None
    run_name: str = "sft"
    export: bool = True
    export_dtype: str = "bfloat16"
    # a progress line every N steps
    log_every: int = 10
    # write the ids each worker trained on per step to <output>/sample_log/
    sample_log: bool = False
    # fault-injection for tests: the last worker fails once at this step
    fail_at_step: Optional[int] = None


# ---------------------------------------------------------------------------
# The training loop: runs on every Ray Train worker.
# ---------------------------------------------------------------------------
def train_loop_per_worker(loop: dict) -> None:
    import shutil
    import tempfile

    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from PIL import Image

    from aesformer import deepspeed_engine, sft
    from aesformer.actions import ActionPlan, thinker_instruction
    from aesformer.models import add_plan_tokens, load_vlm

    cfg: SFTConfig = loop["cfg"]
    t_begin = time.perf_counter()
    torch.set_num_threads(max(1, cfg.ray.worker_threads))
    torch.manual_seed(cfg.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    instruction = thinker_instruction(cfg.instruction)

    # -- the model: tag tokens, LoRA, the vision tower frozen ---------------------------
    dtype = torch.bfloat16 if cfg.deepspeed.bf16 else torch.float32
    model, processor = load_vlm(loop["model_path"], dtype=dtype)
    add_plan_tokens(model, processor)
    if cfg.deepspeed.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = sft.apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.full_modules)
    model.train()
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = processor.tokenizer.eos_token_id

    # -- where the run stands: fresh, restarted after a failure, or resumed ---------------
    layout = sft.step_layout(loop["rows"], world, cfg.micro_batch, cfg.grad_accum, cfg.epochs)
    checkpoint = ray.train.get_checkpoint()  # after a worker failure, or this run's latest
    if checkpoint is None and loop["resume_from"]:
        checkpoint = ray.train.Checkpoint(*reversed(storage.filesystem(loop["resume_from"])))
    restored: Optional[dict] = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            restored = checkpoints.read_state(folder)
            if restored is not None and restored.get("world_size") != world:
                # ZeRO partitions reload only on the world size that wrote them;
                # the adapter does not care (the optimizer moments restart).
                sft.load_adapter_weights(model, Path(folder) / sft.ADAPTER_DIR)

    warmup = sft.warmup_steps(layout.total_steps, cfg.warmup_ratio)
    engine = deepspeed_engine.initialize(
        model,
        deepspeed_engine.deepspeed_config(cfg.deepspeed.zero_stage, cfg.deepspeed.bf16, cfg.lr, cfg.weight_decay, cfg.grad_clip,
                            cfg.micro_batch, cfg.grad_accum),
        lr_scheduler=lambda optimizer: sft.make_scheduler(optimizer, layout.total_steps, warmup, cfg.schedule),
    )

    # counts: this worker's since the start (rank 0 carries the restored
    # totals); totals: all workers' together, summed every step
    step, counts, totals = 0, sft.SampleCounts(), sft.SampleCounts()
    if restored is not None:
        totals = sft.SampleCounts.from_dict(restored.get("counts"))
        if rank == 0:
            counts = sft.SampleCounts.from_dict(restored.get("counts"))
        if restored.get("world_size") == world:
            with checkpoint.as_directory() as folder:
                deepspeed_engine.load_checkpoint(engine, folder)  # model, optimizer, scheduler
            step = int(restored["step"])
        else:
            step = sft.resumed_step(int(restored["samples_seen"]), layout)
            engine.lr_scheduler.last_epoch = step
            for group, base in zip(engine.optimizer.param_groups, engine.lr_scheduler.base_lrs):
                group["lr"] = base * sft.lr_factor(step, layout.total_steps, warmup, cfg.schedule)
            if rank == 0:
                log.warning("world size changed from %s to %d: restored the adapter weights; the optimizer "
                            "moments restart at step %d", restored.get("world_size"), world, step)
    start_step = step
    if rank == 0:
        log.info("%s at step %d of %d (%d workers × micro-batch %d × accumulation %d, %.1f epochs); model and "
                 "engine ready in %.1fs", "resuming" if restored else "starting", step, layout.total_steps, world,
                 cfg.micro_batch, cfg.grad_accum, layout.epoch_at(layout.total_steps), time.perf_counter() - t_begin)

    tracker = Tracker.attach(*loop["tracking"]) if rank == 0 else Tracker.attach(None, None)
    trainable = deepspeed_engine.trainable_parameters(engine.module)
    # A micro-batch whose rows were all bad still runs forward/backward (on
    # this sample, with weight 0) so every worker takes the same steps.
    placeholder = sft.build_sample(processor, Image.new("RGB", (64, 64), (128, 128, 128)), ActionPlan().render(),
                                   instruction=instruction, cutoff=cfg.cutoff, max_pixels=cfg.max_image_pixels)
    sample_log = None
    if cfg.sample_log:
        sample_log = storage.Appender(storage.join(cfg.output, "sample_log", f"rank{rank}.jsonl"))

    def all_sum(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def save(step: int, done: bool, metrics: dict) -> None:
        """Every rank writes its part; Ray Train merges them into one checkpoint."""
        state = {"step": step, "samples_seen": layout.samples_seen(step), "epoch": layout.epoch_at(step),
                 "world_size": world, "total_steps": layout.total_steps, "done": done, "counts": totals.to_dict(),
                 "written_at": time.time(), "metrics": metrics}
        folder = Path(tempfile.mkdtemp(prefix="sft-checkpoint-"))
        deepspeed_engine.save_checkpoint(engine, folder, {"step": step})
        with deepspeed_engine.gathered(trainable):
            if rank == 0:
                sft.save_adapter(engine.module, processor, folder / sft.ADAPTER_DIR)
        if rank == 0:
            checkpoints.write_state(folder, state)
        ray.train.report({**metrics, "step": step, "done": done},
                         checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                         checkpoint_dir_name=f"checkpoint-{step:07d}")
        checkpoints.wait_until_taken()  # a node lost from now on restarts the group from here
        shutil.rmtree(folder, ignore_errors=True)

    # -- the stream: every epoch in its seeded order, skipping what was seen --------------
    shard = ray.train.get_dataset_shard("train")
    batches = shard.iter_batches(batch_size=cfg.micro_batch, batch_format="numpy",
                                 local_shuffle_buffer_size=cfg.shuffle_buffer or None,
                                 local_shuffle_seed=cfg.seed if cfg.shuffle_buffer else None)
    skip = step * cfg.grad_accum
    # with the data cached, every epoch replays the same rows: each is prepared
    # (decoded, tokenized, its pixels patched) once per worker, not once per epoch
    built: Optional[dict] = {} if cfg.cache_data else None

    def prepare(row_id, image, text):
        """The row's sample, or the SampleError that skips it."""
        if built is not None and row_id in built:
            return built[row_id]
        try:
            sample = sft.build_sample(processor, image, text, instruction=instruction, cutoff=cfg.cutoff,
                                      max_pixels=cfg.max_image_pixels, row=row_id)
        except sft.SampleError as exc:
            sample = exc
        if built is not None:
            built[row_id] = sample
        return sample

    t_start = t_step = time.perf_counter()
    step_loss, step_micro, step_tokens, step_ids = 0.0, 0, 0, []
    metrics: dict = dict((restored or {}).get("metrics") or {})
    saved = step
    for index, rows in enumerate(batches):
        if index >= layout.micro_batches:
            break  # the remainder that cannot fill an optimizer step
        if index < skip:
            continue  # trained on before the checkpoint we resumed from
        samples = []
        for row_id, image, text in zip(rows["id"], rows["poor_image"], rows["plan"]):
            sample = prepare(row_id, image, text)
            if isinstance(sample, sft.SampleError):
                counts.add_skipped(sample.reason)
                log.warning("skipping a sample: %s", sample)
                continue
            counts.add_used(sample["cut"])
            samples.append(sample)
            step_ids.append(str(row_id))
        batch = {k: v.to(device) for k, v in sft.collate(samples or [placeholder], pad_id).items()}
        loss = engine(**batch).loss * (1.0 if samples else 0.0)
        engine.backward(loss)
        lr = engine.get_lr()[0]  # the rate this optimizer step applies
        engine.step()
        if samples:
            step_loss += float(loss.detach())
            step_micro += 1
            step_tokens += int(batch["attention_mask"].sum())
        if (index + 1) % cfg.grad_accum:
            continue

        # -- one optimizer step done ----------------------------------------------------
        step += 1
        loss_sum, micro_n, tokens, *count_vec = all_sum([step_loss, step_micro, step_tokens] + counts.as_vector())
        totals = sft.SampleCounts.from_vector(count_vec)
        dt = time.perf_counter() - t_step
        metrics = {
            "train/loss": loss_sum / max(1.0, micro_n), "train/lr": lr, "train/grad_norm": deepspeed_engine.global_grad_norm(engine),
            "train/tokens_per_s": tokens / max(dt, 1e-9), "train/step_time_s": dt,
            "train/samples_seen": layout.samples_seen(step), "train/epoch": layout.epoch_at(step),
            "data/used": totals.used, "data/cut": totals.cut,
            **{f"data/skipped_{r}": n for r, n in totals.skipped.items()},
        }
        tracker.log_metrics(metrics, step=step)
        if sample_log is not None:
            sample_log.write({"step": step, "rank": rank, "ids": step_ids})
        if rank == 0:
            progress.report(loop.get("progress"), step, layout.total_steps, f"loss {metrics['train/loss']:.4f}")
        if rank == 0 and (step % max(1, cfg.log_every) == 0 or step == layout.total_steps):
            per_step = (time.perf_counter() - t_start) / (step - start_step)
            log.info("step %d/%d  epoch %.2f  loss %.4f  lr %.3g  %.0f tok/s  eta %.0fs", step, layout.total_steps,
                     layout.epoch_at(step), metrics["train/loss"], lr, metrics["train/tokens_per_s"],
                     per_step * (layout.total_steps - step))
        step_loss, step_micro, step_tokens, step_ids = 0.0, 0, 0, []
        if cfg.fail_at_step is not None and step == cfg.fail_at_step and restored is None and rank == world - 1:
            raise RuntimeError(f"injected failure at step {step} (fail_at_step)")
        stop = cfg.max_steps is not None and step >= cfg.max_steps and step < layout.total_steps
        if stop or step % cfg.checkpoint_every == 0 or step >= layout.total_steps:
            save(step, step >= layout.total_steps, metrics)
            saved = step
        if stop:
            if rank == 0:
                log.info("stopping at step %d (max_steps); resume=auto continues from here", step)
            return
        t_step = time.perf_counter()
    if saved != step:
        # the stream ran short of the plan: the last state is the final one
        save(step, True, metrics)


# ---------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------
def _check(cfg: SFTConfig) -> None:
    from aesformer.sft import SCHEDULES

    from aesformer.data import find_dataset

    cfg.data = str(find_dataset(cfg.data))
    checkpoints.check_resume(cfg.resume)
    parse_workers(cfg.num_workers)
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got '{cfg.schedule}'")
    for key in ("epochs", "micro_batch", "grad_accum", "cutoff", "checkpoint_every", "keep_checkpoints"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {getattr(cfg, key)}")


def training_rows(cfg: SFTConfig) -> tuple[int, Optional[str]]:
    """(rows with a plan in the chosen split, the split to read). Pairs that
    were never split (every row's split null) are all taken, with a warning,
    as the distillation job does."""
    from aesformer.data import read_table

    split = cfg.split
    table = read_table(cfg.data, columns=["plan", "split"])  # found by _check: a local folder or a URI
    if split is not None and table.num_rows and table.column("split").null_count == table.num_rows:
        log.warning("no pair in %s has a split; training on all of them (set split=null to silence)", cfg.data)
        split = None
    if split is not None:
        table = table.filter(pc.equal(table.column("split"), split))
    return table.num_rows - table.column("plan").null_count, split


def training_dataset(cfg: SFTConfig, split: Optional[str]):
    """The training stream as one Ray Dataset: id, poor photo bytes and plan
    of every row with a plan, once per epoch, each epoch's blocks in their
    own seeded order (the workers also shuffle locally, seeded)."""
    from ray.data.expressions import col

    from aesformer.data import read_ray, read_table

    columns = ["id", "poor_image", "plan"]
    if cfg.cache_data:
        # read once here, replay from the object store every epoch
        import ray.data

        table = read_table(cfg.data, columns=columns + ["split"], split=split)
        table = table.filter(pc.is_valid(table.column("plan"))).select(columns)
        base = ray.data.from_arrow(table)
    else:
        base = read_ray(cfg.data, split=split)
        base = base.filter(expr=col("plan").is_not_null()).select_columns(columns)
    epochs = [base.randomize_block_order(seed=cfg.seed + e) for e in range(cfg.epochs)]
    return epochs[0].union(*epochs[1:]) if len(epochs) > 1 else epochs[0]


def choose_start(cfg: SFTConfig) -> tuple[str, Optional[str], Optional[dict]]:
    """(Ray run name, checkpoint to start from, its trainer state).

    A rerun keeps the run name of the checkpoint it continues, so Ray Train's
    own record of that run (and its checkpoint retention) carries on.
    """
    from aesformer.deepspeed_engine import CHECKPOINT_TAG

    root = storage.join(cfg.output, "ray")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    fresh_name = cfg.run_name if not storage.exists(storage.join(root, cfg.run_name)) else f"{cfg.run_name}-{stamp}"
    found = checkpoints.resolve_resume(cfg.resume, root, "*/*", required=CHECKPOINT_TAG)
    if found is None:
        return fresh_name, None, None
    folder, state = found
    # resume=auto continues the run it found; an explicit folder starts a new run name
    run_name = storage.name(storage.parent(folder)) if cfg.resume == "auto" else f"{cfg.run_name}-{stamp}"
    return run_name, str(folder), state


def run(cfg: SFTConfig) -> dict:
    """Train, export, and return the paths (``merged``: GRPO-A's starting
    policy) with the run's key figures."""
    _check(cfg)
    workers = parse_workers(cfg.num_workers)
    ray = init_ray(cfg.ray)
    check_across_nodes(cfg, ray)  # output shared by every node, no SQLite tracking file across nodes
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.data import ExecutionOptions

    from aesformer import sft
    from aesformer.models import resolve_model

    with Tracker.start(cfg, "sft") as tracker:
        model_path = resolve_model(cfg.models.thinker, cfg.models.cache_dir, "models.thinker")
        rows, split = training_rows(cfg)
        if rows == 0:
            raise no_plans_error(cfg.data, "data", split)
        run_name, resume_from, state = choose_start(cfg)
        use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
        log.info("%d training rows; run '%s'%s", rows, run_name, f", resuming from {resume_from}" if resume_from else "")

        final = resume_from if state and state.get("done") else None
        ray_store, reported = storage.ray_train_storage(storage.join(cfg.output, "ray"))
        if final is None:
            steps = RemoteProgress("sft", unit="steps")
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={"cfg": cfg, "rows": rows, "resume_from": resume_from, "model_path": model_path,
                                   "tracking": (tracker.uri, tracker.run_id), "progress": steps.queue},
                scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                             resources_per_worker={"CPU": cfg.cpus_per_worker}),
                torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
                run_config=RunConfig(
                    name=run_name, **ray_store,
                    checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                    failure_config=FailureConfig(max_failures=cfg.max_failures)),
                datasets={"train": training_dataset(cfg, split)},
                # a fixed row order, so each epoch's (seeded) order can be replayed on resume
                dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
            )
            with tracker.phase("train"), steps:
                result = trainer.fit()
            if result.checkpoint is None:
                raise RuntimeError("training ended without a checkpoint")
            final = reported(result.checkpoint.path)
        state = checkpoints.read_state(final) or {}
        out: dict = {"checkpoint": str(final), "step": state.get("step"), "total_steps": state.get("total_steps"),
                     "done": bool(state.get("done")), "counts": state.get("counts"), "rows": rows,
                     "tracking_uri": tracker.uri, "run_id": tracker.run_id}
        counts = sft.SampleCounts.from_dict(state.get("counts"))
        tracker.log_metrics({"data/rows": rows, "data/used": counts.used, "data/cut": counts.cut,
                             **{f"data/skipped_{r}": n for r, n in counts.skipped.items()}}, step=state.get("step"))
        if counts.cut or counts.skipped_total:
            log.info("samples cut at %d tokens: %d; skipped: %s", cfg.cutoff, counts.cut, counts.skipped)
        tracker.log_artifact(storage.join(final, checkpoints.STATE_FILE))

        if cfg.export and state.get("done"):
            with tracker.phase("export"):
                export = ray.remote(num_cpus=1)(sft.export_model)
                paths = ray.get(export.remote(model_path, storage.join(final, sft.ADAPTER_DIR),
                                              storage.join(cfg.output, "export"), cfg.export_dtype))
            out.update(paths)
            out["export"] = paths["merged"]
            tracker.log_artifact(storage.join(paths["adapter"], "adapter_config.json"), "adapter")
            log.info("AesThinker-SFT exported to %s (adapter: %s)", paths["merged"], paths["adapter"])
        elif not state.get("done"):
            log.info("stopped at step %s of %s; rerun with resume=auto to continue", state.get("step"),
                     state.get("total_steps"))
    return out


def main(argv=None) -> dict:
    return run_job(SFTConfig, "sft", run, argv, check=_check)


if __name__ == "__main__":
    main()

"""GRPO-A: reinforcement learning of AesThinker on AesRecon (stage 1b).

Starting from the SFT policy (``init=``), each step takes prompts (the poor
photo with the thinker's instruction, and the pair's reference plan) from the
train split of ``data=``, samples ``rollout.n`` plans per prompt on the
rollout pool, scores them on the reward pool (r = λf·Rf + λa·Ra + λc·Rc,
judge VLM or rule-based alignment) while the reference pool computes the
starting policy's log-probs, turns rewards into group-normalised advantages,
updates the DeepSpeed learner group with the GRPO-A loss (clipped policy
loss + k3 KL, token-mean), and pushes the new weights to the rollout engines
before the next step. Reward scoring and reference log-probs start on the
first finished groups of a step rather than waiting for the whole batch.

Every step logs to MLflow each reward component, format rate, KL, entropy,
response length, advantage statistics, clip fraction, the log-prob mismatch
between the rollout engines and the learner (a broken weight sync shows
there) and the time of each phase. Validation before the first step and
every ``val_every`` steps on the held-out pairs, all of them unless
``val_prompts`` caps it (temperature 0.6, top-p 0.95, n=1); checkpoints every
``checkpoint_every`` steps (learner weights and optimizer, data position, RNG
state, step), ``resume=auto`` continues from the newest. A rollout, reward or
reference actor that dies (its process or its node) is replaced, on what
survives, and its work retried. A learner rank that dies takes the group
down: the run starts the group again from the newest checkpoint within the
same job (``learner.max_restarts`` times) and redoes the steps since, with
the same prompts. Each recovery is logged and in ``result.json`` with the
steps it redid.

    python jobs/grpo_a.py profile=tiny
    ray job submit --working-dir . -- python jobs/grpo_a.py data=<AesRecon dir> init=<SFT model dir> output=<dir>
"""
from __future__ import annotations

if __package__ in (None, ""):
    import _prelude  # noqa: F401  (makes aesformer importable when run as a script)

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from aesformer.cluster import init_ray, object_store_created_bytes
from aesformer.config import ConfigError, JobConfig
from aesformer.job import run_job
from aesformer.progress import DETAIL, Progress
from aesformer.synth import sample_aesrecon
from aesformer import checkpoints, storage
from aesformer.data import find_dataset, no_plans_error
from aesformer.placement import STRATEGIES, PoolAsk, cluster_nodes, plan_table, shrink_cpus
from aesformer.placement import plan as plan_pools
from aesformer.storage import check_across_nodes
from aesformer.tracking import Tracker

log = logging.getLogger("grpo_a")


# -- config -------------------------------------------------------------------------------

@dataclass
class RolloutConfig:
    engine: str = "auto"  # vllm | hf | auto (vllm where CUDA and vllm are present)
    actors: int = 4
    gpus_per_actor: float = 1.0  # = tensor_parallel for vllm
    cpus_per_actor: float = 2.0
    tensor_parallel: int = 1
    dtype: str = "bfloat16"
    gpu_memory_utilization: float = 0.85
    n: int = 5  # samples per prompt (the group)
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024  # max response
    max_prompt_tokens: int = 2048
    min_pixels: Optional[int] = 262144  # the photo is scaled into [min_pixels, max_pixels] (the released range)
    max_pixels: int = 4194304
    chunk_prompts: int = 8  # prompts per generate call; scoring starts as each chunk finishes
    threads: Optional[int] = None  # torch threads per actor on CPU (0: every core); null: ray.worker_threads
    resources: dict = field(default_factory=dict)  # custom resources per actor, e.g. {node_b: 1} pins it
    # one-step-off-policy: step k+1's rollout runs while the learner updates on step k
    # (its samples come from the weights before that update; the ratio uses their own log-probs)
    async_: bool = False  # the key is rollout.async


@dataclass
class RewardConfig:
    weights: list = field(default_factory=lambda: [0.1, 0.5, 0.4])  # λf, λa, λc
    alignment: str = "judge"  # judge | rule (rule_alignment instead of the judge's Ra)
    prompts: str = "default"  # the judge's prompts: a name in conf/prompts/ or a YAML file
    judge_text: str = "plain"  # plain: plans without their tags (as released) | tagged: as written
    image_max_side: Optional[int] = 512  # the photo's longer side for Rc (null: as the rollout saw it)
    format: str = "strict"  # Rf: strict (each dimension in its own tags) | headers (the seven headers in order)
    engine: str = "auto"
    actors: int = 2
    gpus_per_actor: float = 2.0
    cpus_per_actor: float = 2.0
    tensor_parallel: int = 2
    dtype: str = "bfloat16"
    gpu_memory_utilization: float = 0.85
    max_model_len: int = 4096
    max_pixels: int = 1048576
    chunk_plans: int = 64  # plans per scoring call
    resources: dict = field(default_factory=dict)


@dataclass
class ReferenceConfig:
    actors: int = 1
    gpus_per_actor: float = 1.0
    cpus_per_actor: float = 2.0
    dtype: str = "bfloat16"
    micro_batch: int = 8
    threads: Optional[int] = None  # torch threads per actor on CPU (0: every core); null: ray.worker_threads
    resources: dict = field(default_factory=dict)


@dataclass
class LearnerConfig:
    workers: int = 8
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 2.0
    # auto: ZeRO-2 where the weights fit a rank whole (no gathers in every pass), else ZeRO-3
    zero_stage: Any = "auto"
    rank_memory_gb: Optional[float] = None  # a rank's memory; null: on CPU the node's RAM shared by its ranks, on GPU unknown (ZeRO-3)
    bf16: bool = True
    lr: float = 1e-7
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    micro_batch: int = 4  # sequences per forward pass per worker
    clip_ratio_low: float = 0.2  # the ratio is clipped to [1 - low, 1 + high]
    clip_ratio_high: float = 0.3
    dual_clip: Optional[float] = 3.0  # negative-advantage tokens' loss capped at dual_clip * |A|; 0: off
    kl_coef: float = 1e-2
    kl_estimator: str = "low_var_kl"  # k3
    loss_agg: str = "token-mean"
    freeze_vision: bool = True
    gradient_checkpointing: bool = True
    placement: str = "auto"  # auto: STRICT_PACK (one node) when a node can hold the group, else PACK
    resources: dict = field(default_factory=dict)
    # a rank lost (its node, its process): the group starts again, wherever the cluster has
    # room, from the newest checkpoint, this many times in one run
    max_restarts: int = 2
    sync_bucket_mb: int = 64  # weights travel to the rollout engines in broadcast buckets of this size


@dataclass
class GrpoAConfig(JobConfig):
    output: str = "runs/grpo_a"
    data: Optional[str] = None  # AesRecon folder (Parquet); tiny profile: built from sample photos when unset
    init: Optional[str] = None  # the SFT policy folder; unset: models.thinker
    instruction: Optional[str] = None  # overrides the thinker's default instruction
    steps: Optional[int] = None  # total steps; unset: `epochs` passes over the train split
    epochs: int = 1
    prompts_per_step: int = 512  # rollout batch
    prompts_per_update: int = 128  # update batch (an optimizer step each)
    sync_every: int = 1  # push weights to the rollout engines every k steps (0: never; debugging only)
    val_every: int = 4  # validate before the first step and every k steps (0: never)
    val_prompts: Optional[int] = None  # validation pairs; None: the whole test split
    val_temperature: float = 0.6
    val_top_p: float = 0.95
    checkpoint_every: int = 5
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto | never | <checkpoint folder>
    stop_after: Optional[int] = None  # end this run after k steps (resume=auto continues)
    export_model: bool = True  # write the final policy to <output>/model
    plan_only: bool = False  # check that the pools fit the cluster, print where each goes, and stop
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)


def check_config(cfg: GrpoAConfig) -> None:
    from aesformer.grpo import AGG_MODES, KL_KINDS
    from aesformer.rewards import ALIGNMENT_MODES, FORMAT_MODES, JUDGE_TEXT_MODES, load_prompts

    if cfg.prompts_per_step < 1 or cfg.prompts_per_update < 1:
        raise ConfigError("prompts_per_step and prompts_per_update must be at least 1")
    if cfg.prompts_per_step % cfg.prompts_per_update:
        raise ConfigError(f"prompts_per_step ({cfg.prompts_per_step}) must be a multiple of prompts_per_update "
                          f"({cfg.prompts_per_update})")
    if len(cfg.reward.weights) != 3:
        raise ConfigError(f"reward.weights needs three numbers (format, alignment, creativity), got {cfg.reward.weights}")
    if cfg.reward.alignment not in ALIGNMENT_MODES:
        raise ConfigError(f"reward.alignment must be one of {', '.join(ALIGNMENT_MODES)}, got '{cfg.reward.alignment}'")
    if cfg.reward.judge_text not in JUDGE_TEXT_MODES:
        raise ConfigError(f"reward.judge_text must be one of {', '.join(JUDGE_TEXT_MODES)}, got '{cfg.reward.judge_text}'")
    if cfg.reward.format not in FORMAT_MODES:
        raise ConfigError(f"reward.format must be one of {', '.join(FORMAT_MODES)}, got '{cfg.reward.format}'")
    try:
        load_prompts(cfg.reward.prompts)
    except ValueError as e:
        raise ConfigError(f"reward.prompts: {e}") from e
    if cfg.learner.loss_agg not in AGG_MODES:
        raise ConfigError(f"learner.loss_agg must be one of {', '.join(AGG_MODES)}")
    if cfg.learner.kl_estimator not in KL_KINDS:
        raise ConfigError(f"learner.kl_estimator must be one of {', '.join(KL_KINDS)}")
    ln = cfg.learner
    if not 0.0 <= ln.clip_ratio_low < 1.0 or ln.clip_ratio_high < 0.0:
        raise ConfigError(f"learner.clip_ratio_low must be in [0, 1) and learner.clip_ratio_high >= 0, got "
                          f"{ln.clip_ratio_low} and {ln.clip_ratio_high}")
    if ln.dual_clip and ln.dual_clip <= 1.0:
        raise ConfigError(f"learner.dual_clip must be greater than 1 (or 0 to turn it off), got {ln.dual_clip}")
    if cfg.rollout.n < 2:
        raise ConfigError("rollout.n must be at least 2: GRPO compares samples within a group")
    if cfg.learner.max_restarts < 0:
        raise ConfigError(f"learner.max_restarts must be 0 or more, got {cfg.learner.max_restarts}")
    if ln.zero_stage not in ("auto", 0, 1, 2, 3):
        raise ConfigError(f"learner.zero_stage must be auto, 0, 1, 2 or 3, got {ln.zero_stage!r}")
    if cfg.learner.placement not in STRATEGIES:
        raise ConfigError(f"learner.placement must be one of {', '.join(STRATEGIES)}, got '{cfg.learner.placement}'")
    checkpoints.check_resume(cfg.resume)


def check_inputs(cfg: GrpoAConfig) -> None:
    """What can be checked before anything starts: the config, and the data folder."""
    check_config(cfg)
    if cfg.data is not None:
        cfg.data = str(find_dataset(cfg.data))
    elif cfg.profile != "tiny" and not cfg.plan_only:  # a plan check reads no data
        raise ConfigError("data= is required: the AesRecon folder to train on")


# -- placement --------------------------------------------------------------------------

def pool_asks(cfg: GrpoAConfig) -> list[PoolAsk]:
    """What each pool asks of the cluster, the learner group first (it is placed first)."""
    from aesformer.rewards import needs_judge

    ro, rw, ref, ln = cfg.rollout, cfg.reward, cfg.reference, cfg.learner
    judge = needs_judge(rw.weights, rw.alignment)
    asks = [PoolAsk("learner", ln.workers, {"CPU": ln.cpus_per_worker, "GPU": ln.gpus_per_worker, **ln.resources},
                    ln.placement),
            PoolAsk("rollout", ro.actors, {"CPU": ro.cpus_per_actor, "GPU": ro.gpus_per_actor, **ro.resources}),
            PoolAsk("reward", rw.actors, {"CPU": rw.cpus_per_actor, "GPU": rw.gpus_per_actor if judge else 0,
                                          **rw.resources})]
    if ln.kl_coef != 0:
        asks.append(PoolAsk("reference", ref.actors, {"CPU": ref.cpus_per_actor, "GPU": ref.gpus_per_actor,
                                                     **ref.resources}))
    return asks


def fit_pools(cfg: GrpoAConfig, nodes) -> tuple[list[PoolAsk], dict]:
    """Check the pools against the cluster's nodes before anything loads
    (PlacementError with the table when they do not fit). With
    ``ray.fit_cpus`` the CPU asks shrink to the cluster first. The learner's
    strategy and the CPU asks the pools will use are written back to ``cfg``."""
    asks = pool_asks(cfg)
    if cfg.ray.fit_cpus:
        factor = shrink_cpus(asks, nodes)
        if factor < 1:
            log.info("pools ask more CPUs than the cluster has: CPU asks scaled by %.2f (ray.fit_cpus)", factor)
    placed = plan_pools(asks, nodes)
    cpus = {a.name: a.bundle.get("CPU", 0.0) for a in asks}
    cfg.learner.cpus_per_worker = cpus["learner"]
    cfg.rollout.cpus_per_actor = cpus["rollout"]
    cfg.reward.cpus_per_actor = cpus["reward"]
    if "reference" in cpus:
        cfg.reference.cpus_per_actor = cpus["reference"]
    cfg.learner.placement = placed["learner"]["strategy"]
    return asks, placed


def learner_zero_stage(cfg: GrpoAConfig, policy: str) -> int:
    """The learner's ZeRO stage: as configured, or for ``auto`` by the
    policy's size against a rank's memory (``learner.rank_memory_gb``; unset:
    on CPU the node's RAM shared by its ranks, on GPU unknown, so ZeRO-3)."""
    import ray

    from aesformer.deepspeed_engine import choose_zero_stage, count_parameters

    ln = cfg.learner
    if ln.zero_stage != "auto":
        return int(ln.zero_stage)
    parameters = count_parameters(policy)
    memory = ln.rank_memory_gb * 1e9 if ln.rank_memory_gb else None
    if memory is None and not ln.gpus_per_worker:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        memory = min(n["Resources"].get("memory", 0.0) for n in nodes) / max(1, ln.workers) if nodes else None
    if not parameters or not memory:
        stage = 3  # size or memory unknown: partition everything
    else:
        stage = choose_zero_stage(parameters, bf16=ln.bf16, world=ln.workers, rank_memory_bytes=memory)
    log.info("learner ZeRO stage %d (auto: %s parameters, %s per rank)", stage,
             f"{parameters:,}" if parameters else "unknown", f"{memory / 1e9:.0f} GB" if memory else "memory unknown")
    return stage


def gpus_needed(cfg: GrpoAConfig) -> int:
    """GPUs the run's pools hold at once: rollout, reward (when the judge is
    needed), reference (when KL is on) and the learner group."""
    from aesformer.rewards import needs_judge

    ro, rw, ref, ln = cfg.rollout, cfg.reward, cfg.reference, cfg.learner
    total = ro.actors * ro.gpus_per_actor + ln.workers * ln.gpus_per_worker
    total += rw.actors * rw.gpus_per_actor if needs_judge(rw.weights, rw.alignment) else 0
    total += ref.actors * ref.gpus_per_actor if ln.kl_coef != 0 else 0
    return math.ceil(total)


# -- data ---------------------------------------------------------------------------------

class Prompts:
    """The prompts of one split: ids in a seeded order per epoch, images read
    from Parquet only for the ids a step takes and scaled into ``pixels``
    (min, max). Rows without a usable plan or photo are quarantined with the
    reason."""

    def __init__(self, folder: Any, split: str, seed: int, instruction: str, quarantine: Any,
                 pixels: tuple = (None, None)):
        from aesformer.data import read_table

        table = read_table(folder, columns=["id", "plan"], split=split)
        if not isinstance(quarantine, storage.Appender):
            quarantine = storage.Appender(quarantine)
        self.folder, self.seed, self.instruction, self.quarantine = folder, seed, instruction, quarantine
        self.pixels = pixels
        self.plans: dict[str, str] = {}
        for rid, plan in zip(table.column("id").to_pylist(), table.column("plan").to_pylist()):
            if plan:
                self.plans[rid] = plan
            else:
                self._quarantine(rid, "no reference plan")
        self.ids = sorted(self.plans)

    def __len__(self) -> int:
        return len(self.ids)

    def _quarantine(self, rid: str, reason: str) -> None:
        self.quarantine.write({"id": rid, "reason": reason})

    def order(self, epoch: int) -> list[str]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))
        return [self.ids[i] for i in perm]

    def take(self, position: int, count: int) -> list[str]:
        """``count`` ids from global position ``position`` (epochs wrap)."""
        out = []
        n = len(self.ids)
        while len(out) < count:
            epoch, i = divmod(position + len(out), n)
            out.extend(self.order(epoch)[i:i + count - len(out)])
        return out

    def load(self, ids: list[str]) -> list[dict]:
        """Prompt records (id, request, reference) for ``ids``, in order; each
        photo decoded once and scaled into ``pixels`` (aspect kept); the pools
        cap it again to their own ``max_pixels``."""
        import pyarrow.compute as pc

        from aesformer.data import PairError, decode_image, shard_dataset
        from aesformer.sft import fit_pixels

        dataset = shard_dataset(self.folder)
        table = dataset.to_table(columns=["id", "poor_image"], filter=pc.field("id").isin(list(set(ids))))
        images = dict(zip(table.column("id").to_pylist(), table.column("poor_image").to_pylist()))
        out = []
        for rid in ids:
            try:
                photo = fit_pixels(decode_image(images.get(rid), row=rid, field="poor_image"), *self.pixels)
            except PairError as e:
                self._quarantine(rid, e.reason)
                continue
            out.append({"id": rid, "request": {"images": [photo], "text": self.instruction},
                        "reference": self.plans[rid]})
        return out


# -- the policy to start from ---------------------------------------------------------------

def prepare_policy(path: str, out: str) -> str:
    """The init policy, with the plan's tag tokens: returned as is when its
    tokenizer has them, else a copy with them added (saved under ``out``, a
    folder or a URI every node reads)."""
    from transformers import AutoProcessor

    from aesformer.actions import SPECIAL_TOKENS

    processor = AutoProcessor.from_pretrained(storage.local_copy(path))
    vocab = processor.tokenizer.get_vocab()
    if all(t in vocab for t in SPECIAL_TOKENS):
        return path
    if storage.exists(storage.join(out, "config.json")) and storage.is_complete(out):
        return str(out)
    from aesformer.models import add_plan_tokens, load_vlm

    log.info("the init policy lacks the plan tokens: adding them (copy in %s)", out)
    model, processor = load_vlm(path)
    add_plan_tokens(model, processor)

    def save(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))

    return storage.write_dir(out, save)


# -- the run ------------------------------------------------------------------------------------

def _stats(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return (float(a.mean()), float(a.std())) if a.size else (0.0, 0.0)


def _dead(actors: list, timeout: float = 30.0) -> list[int]:
    """Indices of the actors that do not answer: one call to each, all in
    flight together (one round trip, not one per actor)."""
    import ray

    refs = [a.get_version.remote() for a in actors]
    ray.wait(refs, num_returns=len(refs), timeout=timeout)
    dead = []
    for i, ref in enumerate(refs):
        try:
            ray.get(ref, timeout=0)
        except Exception:
            dead.append(i)
    return dead


class Trainer:
    """The pools of one GRPO-A run and the step that ties them together."""

    def __init__(self, cfg: GrpoAConfig, policy: str, judge: Optional[str]):
        from aesformer.actors.pool import run_tag

        self.cfg = cfg
        self.tag = run_tag("grpo_a")
        self.policy = policy
        self.pools: list = []
        self.learner = None
        self.learner_starts = 0
        try:
            self._start(policy, judge)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, policy: str, judge: Optional[str]) -> None:
        from aesformer.actors.pool import ResilientPool
        from aesformer.actors.reference import ReferenceWorker
        from aesformer.actors.reward import RewardWorker
        from aesformer.actors.rollout import RolloutWorker
        from aesformer.rewards import load_prompts, needs_judge

        cfg = self.cfg
        ro, rw, ref, ln = cfg.rollout, cfg.reward, cfg.reference, cfg.learner
        self.weights_version = 0
        self.transfer_members: Optional[tuple] = None  # the rollout actors of the current transfer group
        self.syncing = False
        self.transfer_groups = 0  # groups opened (a replaced rollout actor needs a new one)
        timeouts = dict(ready_timeout=cfg.ray.placement_timeout, call_timeout=cfg.ray.call_timeout)
        # the learner group first (its placement is the hardest)
        self._start_learner()
        max_len = ro.max_prompt_tokens + ro.max_tokens
        rollout_opts = dict(dtype=ro.dtype, max_pixels=ro.max_pixels, tensor_parallel_size=ro.tensor_parallel,
                            gpu_memory_utilization=ro.gpu_memory_utilization, max_model_len=max_len,
                            seed=cfg.seed, threads=ro.threads)
        self.rollout = ResilientPool(f"{self.tag}-rollout", RolloutWorker, ro.actors,
                                 {"CPU": ro.cpus_per_actor, "GPU": ro.gpus_per_actor, **ro.resources},
                                 lambda i: (ro.engine, policy, rollout_opts), on_start=self._rejoin,
                                 **timeouts)
        self.pools.append(self.rollout)
        judge_needed = needs_judge(rw.weights, rw.alignment)
        reward_opts = dict(dtype=rw.dtype, max_pixels=rw.max_pixels, tensor_parallel_size=rw.tensor_parallel,
                           gpu_memory_utilization=rw.gpu_memory_utilization, max_model_len=rw.max_model_len,
                           seed=cfg.seed)
        judging = dict(prompts=load_prompts(rw.prompts).to_dict(), judge_text=rw.judge_text,
                       image_max_side=rw.image_max_side, format=rw.format)
        reward_bundle = {"CPU": rw.cpus_per_actor, "GPU": rw.gpus_per_actor if judge_needed else 0, **rw.resources}
        self.reward = ResilientPool(f"{self.tag}-reward", RewardWorker, rw.actors, reward_bundle,
                                lambda i: (rw.engine, judge if judge_needed else None, reward_opts,
                                           list(rw.weights), rw.alignment, judging), **timeouts)
        self.pools.append(self.reward)
        self.use_reference = ln.kl_coef != 0
        self.reference = None
        if self.use_reference:
            self.reference = ResilientPool(f"{self.tag}-reference", ReferenceWorker, ref.actors,
                                       {"CPU": ref.cpus_per_actor, "GPU": ref.gpus_per_actor, **ref.resources},
                                       lambda i: (policy, ref.dtype if ref.gpus_per_actor else "float32", None,
                                                  ref.micro_batch, ro.max_pixels, ref.threads), **timeouts)
            self.pools.append(self.reference)

    def _start_learner(self) -> None:
        """The learner group: one placement group (rank 0 hosts the process
        group), every rank set up from ``self.policy``."""
        from aesformer.actors.learner import LearnerWorker
        from aesformer.actors.pool import ResilientPool

        cfg = self.cfg
        ro, ln = cfg.rollout, cfg.learner
        update_seqs = cfg.prompts_per_update * ro.n
        per_rank = math.ceil(update_seqs / ln.workers)
        settings = dict(zero_stage=learner_zero_stage(cfg, self.policy), bf16=ln.bf16, lr=ln.lr,
                        weight_decay=ln.weight_decay,
                        grad_clip=ln.grad_clip, micro_batch=ln.micro_batch,
                        grad_accum=math.ceil(per_rank / ln.micro_batch), clip_ratio_low=ln.clip_ratio_low,
                        clip_ratio_high=ln.clip_ratio_high, dual_clip=ln.dual_clip,
                        kl_coef=ln.kl_coef, kl_estimator=ln.kl_estimator, loss_agg=ln.loss_agg,
                        freeze_vision=ln.freeze_vision, gradient_checkpointing=ln.gradient_checkpointing,
                        temperature=ro.temperature, max_pixels=ro.max_pixels,
                        ratio_base="rollout" if ro.async_ else "learner")
        self.learner = ResilientPool(f"{self.tag}-learner{self.learner_starts or ''}", LearnerWorker, ln.workers,
                                     {"CPU": ln.cpus_per_worker, "GPU": ln.gpus_per_worker, **ln.resources},
                                     lambda i: (i, ln.workers, self.policy, settings), strategy=ln.placement,
                                     max_restarts=0, ready_timeout=cfg.ray.placement_timeout,
                                     call_timeout=cfg.ray.call_timeout)
        self.learner_starts += 1
        master = self.learner.get(self.learner.actors[0].address.remote(), "address")
        info = self.learner.get_all("setup", *master)
        log.info("learner group ready: %d workers, %s trainable parameters, on %s", ln.workers,
                 f"{info[0]['trainable_parameters']:,}", ", ".join(map(str, self.learner.nodes() or ["?"])))

    def restart_learner(self, reason: str) -> None:
        """Start the learner group again (a rank was lost): the old group and
        its placement go, a new group is placed wherever the cluster has room
        (at most ``ray.placement_timeout`` seconds) and set up from the
        starting policy; calls still pending on any pool are dropped, and the
        next sync opens a new transfer group with every engine."""
        log.warning("learner group lost (%s); starting it again", reason[:300])
        if self.learner is not None:
            self.learner.shutdown()
            self.learner = None
        for pool in self.pools:
            pool.forget()
        self.transfer_members = None
        self.weights_version = 0
        self._start_learner()

    def learner_lost(self) -> bool:
        """Whether a learner rank is dead or stuck (does not answer)."""
        return self.learner is None or bool(_dead(list(self.learner.actors)))

    def restore(self, folder: Path, state: dict) -> str:
        """Load a checkpoint into the learner group, check its weights against
        the ones saved, and send them to the engines; returns their checksum."""
        self.learner.get_all("load", str(folder))
        checksum = self.learner.get_all("checksum")[0]
        if state.get("weights_sha256") and checksum != state["weights_sha256"]:
            raise RuntimeError(f"the weights loaded from {folder} differ from the ones saved there")
        self.learner.get_all("set_version", state["step"])
        self.sync(state["step"])
        return checksum

    def placement(self) -> dict:
        """The node of every actor of every pool, as Ray placed them now."""
        return {name: pool.nodes() for name, pool in
                [("learner", self.learner)] + [(p.name.rsplit("-", 1)[-1], p) for p in self.pools] if pool}

    def shutdown(self) -> None:
        for pool in self.pools + ([self.learner] if self.learner else []):
            pool.shutdown()

    # -- weights ----------------------------------------------------------------------------
    def _open_transfer(self, actors: list) -> None:
        """A new transfer group: learner rank 0 and the engines of ``actors``."""
        sizes = self.rollout.get([a.transfer_world_size.remote() for a in actors], "transfer_world_size", 600)
        self.learner.get(self.learner.call_all("init_transfer", actors, sizes, self.cfg.learner.sync_bucket_mb << 20),
                         "init_transfer", 900)
        self.transfer_groups += 1

    def _rejoin(self, actor: Any) -> None:
        """A replacement rollout actor loaded the starting policy from disk: it
        joins a transfer group of its own and receives the learner's current
        weights; the next sync opens a group with every engine again."""
        if self.syncing or self.weights_version == 0:
            return  # a sync in progress reopens the group itself; version 0 is what it loaded
        self.transfer_members = None
        self._open_transfer([actor])
        self.learner.get(self.learner.call_all("send_weights", None), "send_weights", 900)

    def sync(self, version: int) -> dict:
        """Send the learner's weights (tagged ``version``) to every rollout
        engine over the transfer group, opening a new group when the engines
        changed. A rollout actor that dies meanwhile is replaced and the sync
        retried once. Returns bytes, tensors, the send's seconds and the
        seconds of a raw in-process copy of the same tensors."""
        from aesformer.cluster import object_store_created_bytes

        created = after = None
        driver = dict(driver_alive=0.0, driver_store=0.0, driver_call=0.0)
        clock = time.perf_counter
        self.syncing = True
        try:
            for attempt in (0, 1):
                # a rollout actor that died since its last call is replaced first
                t = clock()
                for i in _dead(list(self.rollout.actors)):
                    self.rollout.restart(i, "found dead before the weight sync")
                driver["driver_alive"] += clock() - t
                members = tuple(self.rollout.generations)
                try:
                    if self.transfer_members != members:
                        self._open_transfer(list(self.rollout.actors))
                        self.transfer_members = members
                    t = clock()
                    created = object_store_created_bytes()  # around the send itself, not restarts
                    t1 = clock()
                    stats = self.learner.get(self.learner.call_all("send_weights", version), "send_weights", 900)[0]
                    t2 = clock()
                    after = object_store_created_bytes()
                    driver["driver_store"] += (t1 - t) + (clock() - t2)
                    driver["driver_call"] += t2 - t1
                    break
                except Exception as e:
                    self.transfer_members = None
                    dead = _dead(list(self.rollout.actors))
                    if attempt or not dead:
                        raise
                    for i in dead:
                        self.rollout.restart(i, f"died during the weight sync ({type(e).__name__})")
        finally:
            self.syncing = False
        self.weights_version = version
        stats["object_store_bytes"] = (after - created) if None not in (after, created) else None
        stats["parts"] = {**stats.get("parts", {}), **driver}
        return stats

    # -- one step -------------------------------------------------------------------------------
    def sample_and_score(self, prompts: list[dict], sampling: dict, with_reference: bool) -> tuple[list, dict]:
        """Rollout, then rewards and reference log-probs, the latter two
        starting on each chunk of groups as soon as it is generated.
        Returns the samples (grouped by prompt, in order) and phase times."""
        from aesformer.actors.pool import as_completed

        chunk = max(1, self.cfg.rollout.chunk_prompts)
        chunks = [prompts[i:i + chunk] for i in range(0, len(prompts), chunk)]
        t0 = time.perf_counter()
        for k, part in enumerate(chunks):
            # each chunk its own seed: equal seeds would give every chunk the same random stream
            seeded = {**sampling, "seed": None if sampling.get("seed") is None else sampling["seed"] + 7919 * k}
            self.rollout.submit(k, "generate", [p["request"] for p in part], seeded)
        done: dict[int, list] = {}
        rewards: dict[int, dict] = {}
        refs: dict[int, list] = {}
        marks = {"rollout_end": t0, "reward_start": None, "reward_end": t0, "reference_start": None,
                 "reference_end": t0}
        pools = [self.rollout, self.reward] + ([self.reference] if with_reference else [])
        for pool, key, value in as_completed(pools, self.cfg.ray.call_timeout):
            now = time.perf_counter()
            if pool is self.rollout:
                done[key] = value
                marks["rollout_end"] = now
                part = chunks[key]
                items = [{"text": c["text"], "reference": p["reference"], "image": p["request"]["images"][0]}
                         for p, group in zip(part, value) for c in group]
                marks["reward_start"] = marks["reward_start"] or now
                self.reward.submit(key, "score", items)
                if with_reference:
                    marks["reference_start"] = marks["reference_start"] or now
                    requests = [p["request"] for p, group in zip(part, value) for _ in group]
                    self.reference.submit(key, "logprobs", requests, [c["token_ids"] for g in value for c in g],
                                          sampling["temperature"])
            elif pool is self.reward:
                rewards[key] = value
                marks["reward_end"] = now
            else:
                refs[key] = value
                marks["reference_end"] = now
        samples = []
        for k, part in enumerate(chunks):
            j = 0
            for p, group in zip(part, done[k]):
                for c in group:
                    s = {"prompt_id": p["id"], "request": p["request"], "response_ids": c["token_ids"],
                         "rollout_logprobs": c["logprobs"], "text": c["text"], "finish_reason": c["finish_reason"],
                         "weight_version": c.get("weight_version", 0),
                         **{name: rewards[k][name][j] for name in ("rf", "ra", "rc", "reward")}}
                    s["ref_logprobs"] = refs[k][j] if with_reference else c["logprobs"]
                    samples.append(s)
                    j += 1
        times = {"rollout": marks["rollout_end"] - t0,
                 "reward": marks["reward_end"] - (marks["reward_start"] or t0)}
        if with_reference:
            times["reference"] = marks["reference_end"] - (marks["reference_start"] or t0)
        # wall time of the three overlapping phases together
        times["generate_and_score"] = max(marks["rollout_end"], marks["reward_end"], marks["reference_end"]) - t0
        return samples, times

    def start_update(self, samples: list[dict], version: int) -> tuple:
        """Advantages, then the learner's update(s) on the whole batch, started
        (not awaited): the learner's weights become step ``version``'s."""
        from aesformer.grpo import group_advantages

        n = self.cfg.rollout.n
        adv = group_advantages([s["reward"] for s in samples], n)
        for s, a in zip(samples, adv.tolist()):
            s["advantage"] = a
        keys = ("request", "response_ids", "rollout_logprobs", "ref_logprobs", "advantage")
        lean = [{k: s[k] for k in keys} for s in samples]
        per_update = self.cfg.prompts_per_update * n
        minibatches = [lean[i:i + per_update] for i in range(0, len(lean), per_update)]
        totals = [{"tokens": sum(len(x["response_ids"]) for x in mb), "sequences": len(mb)} for mb in minibatches]
        W = self.learner.size
        # each rank a contiguous share, so a prompt's samples stay together (its prompt runs once)
        refs = [w.update.remote([mb[r * len(mb) // W:(r + 1) * len(mb) // W] for mb in minibatches], totals,
                                lean[0], version)
                for r, w in enumerate(self.learner.actors)]
        return refs, adv, len(minibatches)

    def finish_update(self, started: tuple) -> dict:
        refs, adv, updates = started
        parts = self.learner.get(refs, "update")
        total = {k: sum(p[k] for p in parts) for k in parts[0] if k not in ("mismatch_max", "grad_norm")}
        tokens = max(1.0, total["tokens"])
        return {"logprob_mismatch": total["mismatch"] / tokens,
                "logprob_mismatch_max": max(p["mismatch_max"] for p in parts),
                "entropy": total["entropy"] / tokens, "kl": total["kl"] / tokens,
                "clip_frac": total["clip"] / tokens,
                "dual_clip_frac": total["dual_clip"] / tokens, "pg_loss": total["pg_loss"], "loss": total["loss"],
                "grad_norm": parts[0]["grad_norm"], "updates": updates,
                "advantage_mean": float(adv.mean()), "advantage_std": float(adv.std()),
                "advantage_abs_mean": float(adv.abs().mean())}

    def update(self, samples: list[dict], version: int) -> dict:
        return self.finish_update(self.start_update(samples, version))


def stage_images(prompts: list[dict]) -> int:
    """Put each prompt's (already capped) photo in the object store once; the
    requests then carry the reference, which every pool takes. Returns the
    bytes of the capped photos."""
    from aesformer.actors.images import put_image

    nbytes = 0
    for p in prompts:
        images = p["request"].get("images") or []
        nbytes += sum(im.width * im.height * 3 for im in images)
        p["request"] = {**p["request"], "images": [put_image(im) for im in images]}
    return nbytes


def reward_metrics(samples: list[dict], prefix: str = "") -> dict:
    out = {}
    for name, label in (("reward", "reward"), ("rf", "reward_format"), ("ra", "reward_alignment"),
                        ("rc", "reward_creativity")):
        mean, std = _stats([s[name] for s in samples])
        out[f"{prefix}{label}_mean"], out[f"{prefix}{label}_std"] = mean, std
    out[f"{prefix}format_rate"] = float(np.mean([s["rf"] >= 1.0 for s in samples])) if samples else 0.0
    lengths = [len(s["response_ids"]) for s in samples]
    out[f"{prefix}response_length_mean"], out[f"{prefix}response_length_std"] = _stats(lengths)
    out[f"{prefix}truncated_rate"] = float(np.mean([s["finish_reason"] == "length" for s in samples])) if samples else 0.0
    return out


def validate(trainer: Trainer, val: Prompts, cfg: GrpoAConfig) -> dict:
    """Rewards of one plan per validation pair (the first ``val_prompts`` of
    the split, or all), sampled at the validation temperature and top-p, in
    batches of ``prompts_per_step`` pairs so only one batch of photos is held
    at a time. Returns ``val/*`` metrics and ``time/validate``."""
    t = time.perf_counter()
    ids = val.ids if cfg.val_prompts is None else val.ids[:cfg.val_prompts]
    sampling = {"n": 1, "temperature": cfg.val_temperature, "top_p": cfg.val_top_p,
                "max_tokens": cfg.rollout.max_tokens, "seed": cfg.seed}
    keep = ("rf", "ra", "rc", "reward", "response_ids", "finish_reason")
    scored: list[dict] = []
    for i in range(0, len(ids), cfg.prompts_per_step):
        prompts = val.load(ids[i:i + cfg.prompts_per_step])
        if prompts:
            stage_images(prompts)
            samples, _ = trainer.sample_and_score(prompts, sampling, with_reference=False)
            scored.extend({k: s[k] for k in keep} for s in samples)
    metrics = reward_metrics(scored, "val/")
    metrics["val/pairs"] = len(scored)
    metrics["time/validate"] = time.perf_counter() - t
    return metrics


def run(cfg: GrpoAConfig) -> dict:
    """Trains; returns the output folder, the final model, the last step's
    metrics, the checkpoint folder and the actor restarts."""
    from aesformer.actions import thinker_instruction
    from aesformer.models import require_models_on_nodes, resolve_model

    check_config(cfg)
    # the pools must fit the cluster, and every node see the output, before any data or model loads
    ray = init_ray(cfg.ray)
    asks, placed = fit_pools(cfg, cluster_nodes(ray))
    log.info("pools on the cluster (learner first):\n%s", plan_table(asks, placed), extra=DETAIL)
    log.info("the pools fit the cluster: %s", ", ".join(f"{a.name} {a.count}" for a in asks))
    if cfg.plan_only:
        print(plan_table(asks, placed))
        return {"plan": placed, "table": plan_table(asks, placed)}
    check_across_nodes(cfg, ray)  # an output every node sees, no SQLite tracking store across nodes
    out = cfg.output  # a folder every node sees, or a URI (s3://...)
    ckpt_root = storage.join(out, "checkpoints")
    storage.makedirs(ckpt_root)

    # data and models
    if cfg.data is None:
        if cfg.profile != "tiny":
            raise ConfigError("data= is required: the AesRecon folder to train on")
        data = sample_aesrecon(storage.join(out, "data"), 12, cfg.seed, test_fraction=0.25, job="grpo_a")
    else:
        data = find_dataset(cfg.data)
    instruction = thinker_instruction(cfg.instruction)
    pixels = (cfg.rollout.min_pixels, cfg.rollout.max_pixels)
    quarantine = storage.Appender(storage.join(out, "quarantine.jsonl"))
    train = Prompts(data, "train", cfg.seed, instruction, quarantine, pixels)
    if not len(train):
        raise no_plans_error(data, "data", "train")
    val = Prompts(data, "test", cfg.seed, instruction, quarantine, pixels)
    policy_key = "init" if cfg.init else "models.thinker"
    policy = resolve_model(cfg.init or cfg.models.thinker, cfg.models.cache_dir, policy_key)
    judge = resolve_model(cfg.models.judge, cfg.models.cache_dir, "models.judge")
    require_models_on_nodes(ray, {policy_key: policy, "models.judge": judge})  # on every node, before loading
    policy = prepare_policy(policy, storage.join(out, "init_policy"))
    steps_per_epoch = math.ceil(len(train) / cfg.prompts_per_step)
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch

    # where to start
    start_step, position, rng_state, resume_dir = 1, 0, None, None
    state: dict = {}
    found = checkpoints.resolve_resume(cfg.resume, ckpt_root, "step-*")
    if found is not None:
        resume_dir, state = found
        start_step, position, rng_state = state["step"] + 1, state["data_position"], state["rng"]
    rng = np.random.default_rng(cfg.seed)
    if rng_state is not None:
        rng.bit_generator.state = rng_state

    if state.get("mlflow_run_id") and cfg.tracking.enabled:
        tracker = Tracker.attach(state.get("mlflow_uri"), state["mlflow_run_id"])
    else:
        tracker = Tracker.start(cfg, "grpo_a")
    result: dict = {"output": str(out), "data": str(data), "init": policy, "restarts": 0, "resumed_from": None,
                    "placement": placed}
    steps_log = storage.Appender(storage.join(out, "steps.jsonl"))
    if resume_dir is not None:  # drop steps after the checkpoint: they are redone
        steps_log.keep(lambda record: record["step"] <= state["step"])
    trainer = None
    try:
        trainer = Trainer(cfg, policy, judge)
        if resume_dir is not None:
            checksum = trainer.restore(resume_dir, state)
            result.update(resumed_from=str(resume_dir), resumed_weights_sha256=checksum)
            log.info("resumed from %s: step %d, data position %d", resume_dir, start_step, position)
        sampling = {"n": cfg.rollout.n, "temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p,
                    "max_tokens": cfg.rollout.max_tokens}
        def rollout_step(at: int, seed: int) -> dict:
            """Take, load and stage the prompts at data position ``at``; rollout,
            rewards and reference log-probs on the engines' current weights."""
            ids = train.take(at, cfg.prompts_per_step)
            prompts = train.load(ids)
            created = object_store_created_bytes()
            image_bytes = stage_images(prompts)
            out = {"ids": ids, "image_bytes": image_bytes, "samples": None, "times": {}}
            if prompts:
                out["samples"], out["times"] = trainer.sample_and_score(prompts, {**sampling, "seed": seed},
                                                                        trainer.use_reference)
            after = object_store_created_bytes()  # what this step's data put in the object store
            out["transfer_bytes"] = (after - created) if None not in (after, created) else None
            return out

        if cfg.val_every and start_step == 1 and len(val):
            # before training, as the released training: the SFT policy's rewards are the baseline
            before = validate(trainer, val, cfg)
            tracker.log_metrics(before, step=0)
            result["validation_before"] = before
            log.info("validation before training: reward %.3f format %.2f on %d pairs", before["val/reward_mean"],
                     before["val/format_rate"], before["val/pairs"])
        last: dict = {}
        run_steps, last_step = 0, start_step - 1
        t_run = time.perf_counter()
        ahead: Optional[dict] = None  # rollout.async: the next step's samples, from the weights before this update
        recoveries: list[dict] = []  # learner group restarts
        in_progress = start_step
        steps_bar = Progress("grpo_a", total_steps, "steps", start=start_step - 1)
        while True:  # until the last step, restarting the learner group when a rank is lost
            try:
                for step in range(start_step, total_steps + 1):
                    in_progress = step
                    t_step = time.perf_counter()
                    current = ahead or rollout_step(position, int(rng.integers(2 ** 31)))
                    ahead = None
                    ids, samples, times = current["ids"], current["samples"], dict(current["times"])
                    position += cfg.prompts_per_step
                    last_step = step
                    rng_state = rng.bit_generator.state  # what a checkpoint of this step resumes from
                    if samples is None:
                        log.warning("step %d: every prompt was quarantined (see quarantine.jsonl); skipping it", step)
                        continue
                    t = time.perf_counter()
                    started = trainer.start_update(samples, step)
                    if cfg.rollout.async_ and step < total_steps and not (cfg.stop_after is not None
                                                                          and run_steps + 1 >= cfg.stop_after):
                        # step k+1's rollout on the engines' weights while the learner updates on step k
                        ahead = rollout_step(position, int(rng.integers(2 ** 31)))
                        times["overlapped_rollout"] = ahead["times"].get("generate_and_score", 0.0)
                    metrics = trainer.finish_update(started)
                    times["update"] = time.perf_counter() - t
                    sync = {"bytes": 0, "tensors": 0, "seconds": 0.0, "raw_copy_seconds": 0.0, "object_store_bytes": 0}
                    t = time.perf_counter()
                    if cfg.sync_every and step % cfg.sync_every == 0:
                        sync = trainer.sync(step)
                    # the sync phase's wall time without the raw copy it timed alongside; within it,
                    # the time the weights took to arrive (learner rank 0: the engines' start call to
                    # their finish) and the raw in-process copy of the same tensors it is compared with
                    times["sync"] = time.perf_counter() - t - sync["raw_copy_seconds"]
                    times["sync_raw_copy"] = sync["raw_copy_seconds"]
                    times["sync_transfer"] = sync["seconds"]
                    times.update({f"sync_{k}": v for k, v in sync.get("parts", {}).items()})
                    times["step"] = time.perf_counter() - t_step
                    versions = [s["weight_version"] for s in samples]
                    metrics.update(reward_metrics(samples))
                    metrics.update({f"time/{k}": v for k, v in times.items()})
                    metrics.update({"weight_sync_bytes": sync["bytes"], "weight_sync_object_store_bytes": sync["object_store_bytes"],
                                    "transfer_bytes": current["transfer_bytes"],
                                    "prompt_image_bytes": current["image_bytes"],
                                    "weight_version_mean": float(np.mean(versions)),
                                    "weight_staleness_max": float(max(step - 1 - v for v in versions)),
                                    "weight_transfer_groups": trainer.transfer_groups,
                                    "epoch": position / max(1, len(train)),
                                    "restarts": sum(p.restarts for p in trainer.pools),
                                    "learner_restarts": len(recoveries)})
                    if cfg.val_every and step % cfg.val_every == 0 and len(val):
                        metrics.update(validate(trainer, val, cfg))
                    tracker.log_metrics(metrics, step=step)
                    best = max(samples, key=lambda x: x["reward"])
                    record = {"step": step, "prompt_ids": ids, **metrics, "weight_versions": versions,
                              "best_sample": best["text"][:2000], "nodes": trainer.placement()}
                    steps_log.write(record)
                    eta = (time.perf_counter() - t_run) / (run_steps + 1) * (total_steps - step)
                    log.info("step %d/%d reward %.3f format %.2f kl %.4f mismatch %.2e step %.1fs (eta %.0fs)", step,
                             total_steps, metrics["reward_mean"], metrics["format_rate"], metrics["kl"],
                             metrics["logprob_mismatch"], times["step"], eta, extra=DETAIL)
                    steps_bar.set(step, f"reward {metrics['reward_mean']:.3f}")
                    last = metrics
                    run_steps += 1
                    stopping = cfg.stop_after is not None and run_steps >= cfg.stop_after
                    if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == total_steps or stopping:
                        t = time.perf_counter()
                        folder = storage.join(ckpt_root, f"step-{step:06d}")
                        checkpoints.begin(folder)  # one left by an earlier run is no checkpoint while rewritten
                        trainer.learner.get_all("save", str(folder), {"step": step})
                        checksum = trainer.learner.get_all("checksum")[0]
                        checkpoints.write_state(folder, {
                            "step": step, "data_position": position, "rng": rng_state,
                            "weights_sha256": checksum, "mlflow_run_id": tracker.run_id, "mlflow_uri": tracker.uri,
                            "total_steps": total_steps, "time": time.time()})
                        checkpoints.prune(ckpt_root, "step-*", cfg.keep_checkpoints)
                        result.update(checkpoint=str(folder), checkpoint_weights_sha256=checksum)
                        tracker.log_metrics({"time/checkpoint": time.perf_counter() - t}, step=step)
                    if stopping:
                        log.info("stopping after %d steps of this run (stop_after); resume=auto continues at step %d",
                                 run_steps, step + 1)
                        break
                break
            except Exception as error:
                if len(recoveries) >= cfg.learner.max_restarts or not trainer.learner_lost():
                    raise
                t = time.perf_counter()
                trainer.restart_learner(f"step {in_progress}: {type(error).__name__}: {error}")
                found = checkpoints.newest(ckpt_root, "step-*")
                rng = np.random.default_rng(cfg.seed)
                if found is not None:
                    folder, state = found
                    trainer.restore(folder, state)
                    start_step, position = state["step"] + 1, state["data_position"]
                    rng.bit_generator.state = state["rng"]
                else:  # lost before the first checkpoint: from the starting policy
                    folder, start_step, position = None, 1, 0
                    trainer.sync(0)
                ahead = None
                steps_log.keep(lambda record, last=start_step - 1: record["step"] <= last)
                redone = in_progress - (start_step - 1)
                recoveries.append({"kind": "learner", "lost_at_step": in_progress,
                                   "from_checkpoint": str(folder) if folder else None, "steps_redone": redone,
                                   "seconds": round(time.perf_counter() - t, 1),
                                   "reason": f"{type(error).__name__}: {str(error)[:300]}",
                                   "nodes": trainer.learner.nodes()})
                tracker.log_metrics({"recovery/steps_redone": redone, "recovery/seconds": time.perf_counter() - t,
                                     "learner_restarts": len(recoveries)}, step=in_progress)
                log.warning("learner group restarted (%d of at most %d) on %s from %s in %.0fs: steps %d to %d "
                            "run again, %d step(s) redone", len(recoveries), cfg.learner.max_restarts,
                            ", ".join(map(str, trainer.learner.nodes() or ["?"])), folder or "the starting policy",
                            time.perf_counter() - t, start_step, in_progress, redone)
        steps_bar.close()
        finished = last_step == total_steps
        if cfg.export_model and finished:
            result["model"] = trainer.learner.get_all("export", storage.join(out, "model"))[0]
        result.update(steps=run_steps, last_step=last_step, total_steps=total_steps,
                      metrics=last, finished=finished, restarts=sum(p.restarts for p in trainer.pools),
                      recoveries=recoveries + [{"kind": "pool", "steps_redone": 0, **e}
                                               for p in trainer.pools for e in p.events])
        storage.write_json(storage.join(out, "result.json"), {k: v for k, v in result.items()})
        tracker.close()
        return result
    except BaseException as error:
        tracker.close(error)
        raise
    finally:
        if trainer is not None:
            trainer.shutdown()


def main(argv=None) -> dict:
    return run_job(GrpoAConfig, "grpo_a", run, argv, check=check_inputs)


if __name__ == "__main__":
    main()

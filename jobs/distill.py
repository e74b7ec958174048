"""Action distillation: give every (poor, good) pair a validated seven-dimension plan.

Reads an AesRecon dataset (VCMP's output), finds the transcript of each
pair's segment (subtitles, else Whisper speech recognition in a Ray actor
pool), asks a teacher for the plan that turns the poor photo into the good
one (``measured``: from the pixels; ``openai``: any OpenAI-compatible
endpoint; ``local``: a VLM in a Ray actor pool), checks it with the
validator (format, all seven dimensions, the measured geometry, a judge
model) and sends failures back with feedback, up to ``validator.max_rounds``
rounds. Everything is cached under ``output/`` so a rerun pays nothing twice
and an interrupted run resumes. Writes the dataset with plans
(``output/pairs``), the rejects with reasons, every attempt, a summary and
the SFT chat-format export (``output/sft``).

    python jobs/distill.py input=runs/vcmp/pairs output=runs/distill
    python jobs/distill.py input=... teacher.kind=openai teacher.openai.model=gpt-4o budget.max_requests=2000
"""
from __future__ import annotations

if __package__ in (None, ""):
    import _prelude  # noqa: F401  (makes aesformer importable when run as a script)

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from aesformer import storage
from aesformer.cluster import init_ray
from aesformer.config import ConfigError, JobConfig
from aesformer.distill.settings import (BudgetConfig, JUDGE_KINDS, TEACHER_KINDS, TeacherConfig, TranscriptConfig,
                                        ValidatorConfig)
from aesformer.distill.outputs import make_summary, write_outputs
from aesformer.job import run_job
from aesformer.progress import DETAIL, Progress
from aesformer.tracking import Tracker

log = logging.getLogger("distill")


@dataclass
class DistillConfig(JobConfig):
    # the AesRecon dataset to distill: a folder of pair shards (VCMP's output)
    input: Optional[str] = None
    output: str = "runs/distill"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    validator: ValidatorConfig = field(default_factory=ValidatorConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    transcript: TranscriptConfig = field(default_factory=TranscriptConfig)
    # pairs per batch through transcripts → measurement → teacher/validator rounds
    chunk_size: int = 32
    # distill at most this many pairs (null: all)
    limit: Optional[int] = None
    shard_rows: int = 256
    # SFT chat-format export of the accepted pairs (of this split; null: every pair)
    sft: bool = True
    sft_split: Optional[str] = "train"


def check_config(cfg: DistillConfig) -> Path:
    """Fail early, naming the key, on what a user must fix; returns the input folder."""
    from aesformer.data import find_dataset

    if not cfg.input:
        raise ConfigError("distill needs input=<AesRecon dataset folder>, e.g. input=runs/vcmp/pairs "
                          "(the pairs VCMP wrote)")
    if cfg.teacher.kind not in TEACHER_KINDS:
        raise ConfigError(f"teacher.kind must be one of {', '.join(TEACHER_KINDS)}, got '{cfg.teacher.kind}'")
    if cfg.validator.judge not in JUDGE_KINDS:
        raise ConfigError(f"validator.judge must be one of {', '.join(JUDGE_KINDS)}, got '{cfg.validator.judge}'")
    if cfg.validator.max_rounds < 1:
        raise ConfigError("validator.max_rounds must be at least 1")
    if cfg.chunk_size < 1:
        raise ConfigError("chunk_size must be at least 1")
    return find_dataset(cfg.input, "input")


def pool_asks(cfg: DistillConfig) -> tuple[list, dict]:
    """The actor pools this run starts (local teacher, local judge, speech
    recognition) and the models they load (config key → name)."""
    import dataclasses

    from aesformer.placement import PoolAsk

    asks, models, local = [], {}, {}
    if cfg.teacher.kind == "local":
        local["teacher"] = (cfg.teacher.local, cfg.teacher.local.model or cfg.models.thinker, "teacher.local.model")
    if cfg.validator.judge == "local":
        local["judge"] = (cfg.validator.local, cfg.validator.local.model or cfg.models.judge, "validator.local.model")
    seen = set()
    for role, (c, model, key) in local.items():
        same = (model, tuple(sorted((k, v) for k, v in dataclasses.asdict(c).items() if k != "model")))
        models[key] = model
        if same not in seen:  # a teacher and a judge with the same model and settings share one pool
            seen.add(same)
            asks.append(PoolAsk(role, c.num_actors, {"CPU": c.num_cpus, "GPU": c.num_gpus}))
    t = cfg.transcript
    if t.enabled and t.asr:
        asks.append(PoolAsk("transcript", t.num_actors, {"CPU": t.num_cpus, "GPU": t.num_gpus}))
        models["transcript.model"] = t.model
    return asks, models


def check_cluster(cfg: DistillConfig, ray) -> None:
    """The pools fit the cluster and every node has their models, before any loads."""
    from aesformer.models import require_models_on_nodes, resolve_model
    from aesformer.placement import check_pools

    asks, models = pool_asks(cfg)
    if asks:
        check_pools(ray, asks, "distill")
    if models:
        require_models_on_nodes(ray, {key: resolve_model(name, cfg.models.cache_dir, key)
                                      for key, name in models.items()})


def chunks(rows: Iterator[dict], size: int, limit: Optional[int]) -> Iterator[list[dict]]:
    batch, seen = [], 0
    for row in rows:
        if limit is not None and seen >= limit:
            break
        batch.append(row)
        seen += 1
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def run(cfg: DistillConfig) -> dict:
    """Distills ``cfg.input`` into ``cfg.output``; returns the paths written and the summary."""
    from aesformer.actors.distill_actors import Backends, WhisperPool, make_teacher, make_validator, measure_many
    from aesformer.data import PairError, decode_image, iter_pairs
    from aesformer.distill.cache import FINAL, PlanCache, content_hash, plan_key
    from aesformer.distill.chat import Budget
    from aesformer.distill.loop import LoopResult, feedback_loop, resume_task
    from aesformer.distill.teachers import MEASURED_VERSION, PairTask
    from aesformer.distill.transcript import VideoLocator, gather_transcripts
    from aesformer.models import resolve_model

    source = check_config(cfg)
    out = cfg.output  # a local folder or a URI (s3://...)
    storage.makedirs(out)
    storage.check_across_nodes(cfg, init_ray(cfg.ray))  # on several nodes: no SQLite tracking store
    tracker = Tracker.start(cfg, "distill")
    budget = Budget(cfg.budget.max_requests, cfg.budget.max_tokens)
    timeouts = dict(ready_timeout=cfg.ray.placement_timeout, call_timeout=cfg.ray.call_timeout)
    backends = Backends(budget, cfg.models.cache_dir, cfg.ray.worker_threads, timeouts)
    cache = PlanCache(_plan_cache(out))
    asr = None
    try:
        check_cluster(cfg, init_ray(cfg.ray))
        with tracker.phase("start_models"):
            teacher = make_teacher(cfg.teacher, cfg.models, backends)
            validator = make_validator(cfg.validator, cfg.models, backends)
        settings = {"teacher": teacher.settings(), "validator": validator.settings()}
        log.info("teacher: %s; validator: %s", settings["teacher"], settings["validator"], extra=DETAIL)
        locator = VideoLocator([cfg.transcript.videos] if cfg.transcript.videos else [])
        asr_model = ""
        if cfg.transcript.enabled and cfg.transcript.asr:
            asr_model = cfg.transcript.model
            asr = WhisperPool(resolve_model(asr_model, cfg.models.cache_dir, config_key="transcript.model"),
                              cfg.transcript, cfg.ray.worker_threads, timeouts)

        total = LoopResult()
        keys: dict[str, dict] = {}  # pair id → {"key", "transcript", "source", "reason"}
        reused = seen = 0
        n_input = _count_rows(source)
        n_target = n_input if cfg.limit is None else min(n_input, cfg.limit)
        pairs = Progress("distill", n_target, "pairs")
        for step, rows in enumerate(chunks(iter_pairs(source), cfg.chunk_size, cfg.limit)):
            seen += len(rows)
            with tracker.phase("transcripts", step):
                texts = gather_transcripts(rows, locator, cache, enabled=cfg.transcript.enabled,
                                           asr=asr.transcribe if asr else None, asr_model=asr_model)
            tasks: list[PairTask] = []
            for row, tr in zip(rows, texts):
                key = plan_key(row["poor_image"], row["good_image"], tr["text"], settings)
                keys[row["id"]] = {"key": key, "transcript": tr["text"], "source": tr.get("source"),
                                   "code": tr.get("code"), "reason": tr.get("reason")}
                decided = cache.outcome(key)
                if decided and decided["status"] in FINAL:
                    reused += 1
                    continue
                if decided and decided["status"] == "failed":
                    cache.restart(key)  # the teacher or judge was unreachable last time: try again
                try:
                    poor = decode_image(row["poor_image"], row=row["id"], field="poor_image")
                    good = decode_image(row["good_image"], row=row["id"], field="good_image")
                except PairError as e:
                    cache.finish(key, row["id"], "rejected", {"pair_id": row["id"], "reason": "bad_input",
                                                              "feedback": str(e), "rounds": 0})
                    total.rejected["bad_input"] += 1
                    continue
                tasks.append(resume_task(PairTask(key, row["id"], poor, good, tr["text"]), cache))

            with tracker.phase("measure", step):
                _attach_measurements(tasks, rows, cache, cfg.teacher.measure_max_side, measure_many, content_hash,
                                     MEASURED_VERSION)
            with tracker.phase("teach_validate", step):
                result = feedback_loop(tasks, teacher, validator, cache, max_rounds=cfg.validator.max_rounds)
            total.merge(result)
            pairs.set(seen, _note(total, reused, budget))
            tracker.log_metrics({"distill/accepted": total.accepted, "distill/rejected": sum(total.rejected.values()),
                                 "distill/failed": sum(total.failed.values()), "distill/requests": budget.requests,
                                 "distill/tokens": budget.tokens, "distill/reused": reused}, step=step)
            if result.stopped:
                log.warning("stopping: %s; writing everything finished so far", result.stopped)
                break
        pairs.close()

        with tracker.phase("write"):
            written = write_outputs(cfg, source, out, cache, keys, settings)
        summary = make_summary(cfg, source, out, cache, keys, total, budget, reused, seen, n_input, written)
        storage.write_text(storage.join(out, "summary.json"), json.dumps(summary, indent=1))
        tracker.log_metrics({"distill/final_accepted": summary["accepted"], "distill/final_rejected":
                             sum(summary["rejected"].values()), "distill/pending": summary["pending"]})
        tracker.log_artifact(storage.join(out, "summary.json"))
        log.info("%d accepted, %s rejected, %s failed, %d pending; %d requests%s → %s",
                 summary["accepted"], dict(summary["rejected"]), dict(summary["failed"]), summary["pending"],
                 budget.requests, f" (stopped: {summary['stopped']})" if summary["stopped"] else "", out)
        tracker.close()
        return {"output": out, "dataset": written["dataset"], "rejects": written["rejects_jsonl"],
                "attempts": written["attempts"], "summary": summary, "sft": written.get("sft")}
    except BaseException as error:
        tracker.close(error)
        raise
    finally:
        backends.shutdown()
        if asr is not None:
            asr.shutdown()
        cache.close()
        _keep_plan_cache(out)


def _plan_cache(out: str) -> Path:
    """The plan cache's SQLite file: under a local output; for an output at a
    URI, in its local staging folder, fetched from the URI when this machine
    lacks it (SQLite needs a local file)."""
    if not storage.is_uri(out):
        return Path(out) / "cache.sqlite"
    local = storage.staging(out) / "cache.sqlite"
    if not local.exists() and storage.exists(storage.join(out, "cache.sqlite")):
        local.write_bytes(storage.read_bytes(storage.join(out, "cache.sqlite")))
    return local


def _keep_plan_cache(out: str) -> None:
    """A copy of the plan cache beside an output at a URI, so a rerun from another machine pays nothing twice."""
    if storage.is_uri(out) and (storage.staging(out) / "cache.sqlite").exists():
        storage.write_bytes(storage.join(out, "cache.sqlite"), (storage.staging(out) / "cache.sqlite").read_bytes())


# -- steps ------------------------------------------------------------------------------

def _count_rows(folder: Any) -> int:
    import pyarrow.parquet as pq

    from aesformer.data import finished_shards, parquet_source

    return sum(pq.ParquetFile(**parquet_source(s)).metadata.num_rows for s in finished_shards(folder))


def _attach_measurements(tasks, rows, cache, max_side, measure_many, content_hash, version) -> None:
    """Each task's measured change, from the cache or measured now in parallel Ray tasks."""
    by_id = {r["id"]: r for r in rows}
    todo = []
    for t in tasks:
        row = by_id[t.pair_id]
        mkey = content_hash(b"measure", version, max_side, row["poor_image"], row["good_image"])
        t.measurement = cache.measurement(mkey)
        if t.measurement is None:
            todo.append((t, mkey, row))
    if not todo:
        return
    for (t, mkey, _), m in zip(todo, measure_many([(r["poor_image"], r["good_image"]) for _, _, r in todo], max_side)):
        if "error" in m:
            log.warning("pair %s could not be measured: %s", t.pair_id, m["error"])
            t.measurement = None
            continue
        cache.put_measurement(mkey, m)
        t.measurement = m


def _note(total, reused: int, budget) -> str:
    return (f"accepted {total.accepted} · rejected {sum(total.rejected.values())} · failed "
            f"{sum(total.failed.values())} · reused {reused} · {budget.requests} requests")


def main(argv=None) -> dict:
    return run_job(DistillConfig, "distill", run, argv, check=check_config)


if __name__ == "__main__":
    main()

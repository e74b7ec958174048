"""VCMP: mine (poor, good) photo pairs from photography-tutorial videos.

One streaming Ray Data job. A first, light pass lists the
inputs, hashes and probes every file (a broken one is quarantined in the
rejects table with its reason) and dedupes by video id and content. Then
the videos stream through: screening (manifest rules + VLM) → event
segmentation → 2 fps sampling with cheap prefilters → VLM good-frame judge →
coarse pairs → good-image filtering (IQA, aesthetic, VLM blur check) →
overlay removal on the poor frame (editor, verified, retried) → strict
alignment (VLM + ORB/RANSAC). The driver writes pairs as they arrive into an
AesRecon dataset (aesformer.data shards, split by video), then a funnel
report and a contact sheet. Rerunning skips finished videos; a killed run
resumes without duplicates or lost pairs.

    python jobs/vcmp.py input=runs/samples output=runs/vcmp
"""
from __future__ import annotations

if __package__ in (None, ""):
    import _prelude  # noqa: F401  (makes aesformer importable when run as a script)

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from aesformer import storage
from aesformer.cluster import init_ray
from aesformer.config import ConfigError, JobConfig
from aesformer.job import run_job
from aesformer.progress import DETAIL, Progress
from aesformer.stages import stage_errors
from aesformer.tracking import Tracker
from aesformer.vcmp.recorder import Recorder
from aesformer.vcmp.settings import (AlignConfig, GoodFrameConfig, ImprovementConfig, IngestConfig, OverlayConfig,
                                     PoolsConfig, PrefilterConfig, QualityConfig, SampleConfig, ScreenConfig,
                                     SegmentConfig, SplitConfig)

log = logging.getLogger("vcmp")


@dataclass
class VcmpConfig(JobConfig):
    output: str = "runs/vcmp"
    # a folder of videos (searched recursively), a text file of paths, or a manifest (.jsonl/.csv)
    input: Optional[str] = None
    # optional manifest: video_id, title, source, file, subtitles (a folder's manifest.jsonl is used by default)
    manifest: Optional[str] = None
    # VLM engine: hf (transformers), vllm (GPU) or auto
    engine: str = "auto"
    # images shown to the VLM judge are downscaled to at most this many pixels (null: the processor's default)
    judge_max_pixels: Optional[int] = None
    # vLLM tensor parallel size of the judge (its pool actors should hold as many GPUs)
    judge_tensor_parallel: int = 1
    # the VLM of screening and good-frame detection (paper: Qwen2.5-VL-72B); null: models.judge
    screen_vlm: Optional[str] = None
    # its vLLM tensor parallel size (null: judge_tensor_parallel); the screen and good_frame pools hold as many GPUs
    screen_vlm_tensor_parallel: Optional[int] = None
    ingest: IngestConfig = field(default_factory=IngestConfig)
    screen: ScreenConfig = field(default_factory=ScreenConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    prefilter: PrefilterConfig = field(default_factory=PrefilterConfig)
    good_frame: GoodFrameConfig = field(default_factory=GoodFrameConfig)
    improvement: ImprovementConfig = field(default_factory=ImprovementConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    overlay: OverlayConfig = field(default_factory=OverlayConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    pools: PoolsConfig = field(default_factory=PoolsConfig)
    # run stages good_frame to align in one actor pool (pools.pairs) sharing one judge: on CPU
    # machines, where a pool per stage is a process and a model copy per stage
    fuse_pair_stages: bool = False
    # CPUs per task of the CPU stage (segmentation, then sampling + prefilters, one task per video)
    cpu_stage_cpus: float = 1.0
    # at most this many tasks of the CPU stage at once (null: as many as the CPUs allow);
    # bounds memory by concurrency, whatever the number of videos
    cpu_stage_tasks: Optional[int] = None
    # the CPU stage's tasks run at this niceness (Ray's workers start at 15; 19 lowest; null:
    # as Ray starts them), so that the model stages are not starved by decoding
    cpu_stage_niceness: Optional[int] = 19
    # pairs per Parquet shard (a shard is the unit that becomes durable)
    shard_rows: int = 64
    # a finished video is made durable (its rows flushed, in short shards if need be) by the
    # first row that arrives this many seconds after it finished, or at the end: this bounds
    # the finished work a kill can lose
    checkpoint_s: float = 60.0
    contact_sheet_pairs: int = 8


# -- ingest -------------------------------------------------------------------------------

def check_inputs(cfg: VcmpConfig) -> None:
    if not cfg.input:
        raise ConfigError("set input=<videos folder | list file | manifest>, e.g. input=runs/samples")
    if isinstance(cfg.input, str) and not Path(cfg.input).expanduser().exists():
        raise ConfigError(f"input='{cfg.input}' does not exist: pass a folder of videos, a list file or a manifest")
    from aesformer.scorers import KINDS

    for key in ("iqa", "aesthetic"):
        kind = getattr(cfg.quality, key).kind
        if kind not in KINDS:
            raise ConfigError(f"quality.{key}.kind '{kind}' is not a scorer kind; kinds are {', '.join(KINDS)}")


def ingest(cfg: VcmpConfig, state) -> tuple[list[dict], list[dict], int]:
    """(videos to mine, new rejects, files listed). Dedupe sees the
    videos of earlier runs too (their hashes are in the state log)."""
    from concurrent.futures import ThreadPoolExecutor

    from aesformer.vcmp.flow import probe_entry
    from aesformer.vcmp.ingest import dedupe, list_inputs

    check_inputs(cfg)
    entries, rejects = list_inputs(cfg.input, cfg.manifest, cfg.ingest.extensions)
    listed = len(entries) + len(rejects)
    finished = state.finished()
    done_paths = {r["path"]: r for r in finished.values()}
    new = [e.to_dict() for e in entries if e.path not in done_paths]
    # hashing and probing read headers and two frames: I/O-bound, so threads
    # in the driver do it without the start-up cost of a Ray job of its own
    with ThreadPoolExecutor(max_workers=max(1, cfg.ingest.workers)) as pool:
        probed = list(pool.map(lambda e: probe_entry(e, cfg.ingest), new))
    for e in probed:
        if "reject" in e:
            rejects.append(e["reject"])
    ok = [e for e in probed if "reject" not in e]
    earlier = [{"video_id": r["video_id"], "path": r["path"], "content_hash": r.get("content_hash"), "earlier": True}
               for r in finished.values()]
    kept, dup = dedupe(earlier + ok)
    rejects += [d for d in dup if d["path"] not in done_paths]
    todo = [e for e in kept if not e.get("earlier")]
    return sorted(todo, key=lambda e: e["video_id"]), rejects, listed


# -- the cluster ----------------------------------------------------------------------------------

def pool_asks(cfg: VcmpConfig) -> list:
    """What the model stages' actor pools ask of the cluster (they stream at the same time)."""
    from aesformer.placement import PoolAsk

    P = cfg.pools
    stages = ["screen"] + (["pairs"] if cfg.fuse_pair_stages else ["good_frame", "quality", "overlay", "align"])
    # a pool that may grow asks for its largest size
    return [PoolAsk(name, max(getattr(P, name).size, getattr(P, name).max_size or 0),
                    {"CPU": getattr(P, name).num_cpus, "GPU": getattr(P, name).num_gpus})
            for name in stages]


def check_cluster(cfg: VcmpConfig, ray) -> None:
    """The pools fit the cluster; on several nodes the output and the input
    are folders every node sees and every node has the models."""
    from aesformer.models import require_models_on_nodes, resolve_model
    from aesformer.placement import check_pools
    from aesformer.storage import check_across_nodes, check_visible

    check_pools(ray, pool_asks(cfg), "vcmp")
    # no SQLite tracking store, the output shared, and the videos where every node's workers read them
    check_across_nodes(cfg, ray)
    check_visible(cfg.input, ray, "input")
    models = {"models.judge": cfg.models.judge, "models.editor": cfg.models.editor}
    if cfg.screen_vlm:
        models["screen_vlm"] = cfg.screen_vlm
    require_models_on_nodes(ray, {key: resolve_model(name, cfg.models.cache_dir, key) for key, name in models.items()})


# -- the streaming pipeline -------------------------------------------------------------------

def build_pipeline(cfg: VcmpConfig, ray, videos: list[dict]):
    """The Ray Data plan over the video rows (lazy; nothing runs yet)."""
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    import functools

    from aesformer.actors.vcmp_actors import (CheckAlignment, FilterGoodImages, JudgeGoodFrames, MinePairs,
                                              RemoveOverlays, ScreenVideos, cpu_task_args, decode_batch)
    from aesformer.models import resolve_model
    from aesformer.stages import model_stage
    from aesformer.vcmp import rows as R

    judge = resolve_model(cfg.models.judge, cfg.models.cache_dir, "models.judge")
    screener = (resolve_model(cfg.screen_vlm, cfg.models.cache_dir, "screen_vlm") if cfg.screen_vlm else judge)
    editor = resolve_model(cfg.models.editor, cfg.models.cache_dir, "models.editor")
    table = R.table(R.new_row(v, {"probe": v["probe"], "content_hash": v["content_hash"]}) for v in videos)
    dataset = ray.data.from_arrow([table.slice(i, 1) for i in range(table.num_rows)])
    P = cfg.pools
    common = {"engine": cfg.engine, "max_pixels": cfg.judge_max_pixels,
              "tensor_parallel": cfg.judge_tensor_parallel}
    screening = {**common, "tensor_parallel": cfg.screen_vlm_tensor_parallel or cfg.judge_tensor_parallel}

    def pool(dataset, name, callable_cls, **kwargs):
        """The model stage ``name``: an actor pool sized from its config (pools.<name>), each call
        under ray.call_timeout and the pool's start under ray.placement_timeout."""
        pc = getattr(P, name)
        compute = (ActorPoolStrategy(min_size=pc.size, max_size=pc.max_size) if pc.max_size and pc.max_size > pc.size
                   else ActorPoolStrategy(size=pc.size))
        return model_stage(dataset, name, callable_cls, cfg.ray, compute=compute, num_gpus=pc.num_gpus,
                           num_cpus=pc.num_cpus, batch_size=pc.batch_size, batch_format="pyarrow",
                           fn_constructor_kwargs={**kwargs, "batch_size": max(1, pc.batch_size * 4),
                                                  "num_gpus": pc.num_gpus})

    dataset = pool(dataset, "screen", ScreenVideos, judge=screener, screen=cfg.screen, **screening)
    cpu = dict(ray_remote_args_fn=functools.partial(cpu_task_args, cfg.cpu_stage_cpus),
               compute=TaskPoolStrategy(size=cfg.cpu_stage_tasks), batch_size=1, batch_format="pyarrow")
    dataset = dataset.map_batches(decode_batch, fn_kwargs={"seg": cfg.segment, "sample": cfg.sample, "pre": cfg.prefilter,
                                                           "improvement": cfg.improvement,
                                                           "niceness": cfg.cpu_stage_niceness}, **cpu)
    if cfg.fuse_pair_stages:  # one process and one judge (models.judge) for the good-frame to align stages
        return pool(dataset, "pairs", MinePairs, judge=judge, editor=editor, good=cfg.good_frame,
                    quality=cfg.quality, overlay=cfg.overlay, align=cfg.align, seed=cfg.seed,
                    image_format=cfg.sample.image_format, cache_dir=cfg.models.cache_dir, **common)
    dataset = pool(dataset, "good_frame", JudgeGoodFrames, judge=screener, good=cfg.good_frame, **screening)
    dataset = pool(dataset, "quality", FilterGoodImages, judge=judge, quality=cfg.quality,
                   cache_dir=cfg.models.cache_dir, **common)
    dataset = pool(dataset, "overlay", RemoveOverlays, editor=editor, judge=judge, overlay=cfg.overlay,
                   seed=cfg.seed, image_format=cfg.sample.image_format, **common)
    dataset = pool(dataset, "align", CheckAlignment, judge=judge, align=cfg.align, **common)
    return dataset


def stage_times(dataset) -> dict:
    """{operator: {"wall_s", "cpu_s", "udf_s"}}: task time summed over each
    operator's tasks (udf: inside the stage's own function), from Ray Data's stats."""
    out: dict = {}
    try:
        summary = dataset._get_stats_summary()
    except Exception:  # stats are a report, never a reason to fail
        return out

    def total(stat) -> float:
        return float(getattr(stat, "sum", 0.0) or 0.0) if stat is not None else 0.0

    def visit(s):
        for op in getattr(s, "operators_stats", None) or []:
            out[op.operator_name] = {"wall_s": round(total(op.wall_time), 3), "cpu_s": round(total(op.cpu_time), 3),
                                     "udf_s": round(total(getattr(op, "function_body_time", None)), 3)}
        for parent in getattr(s, "parents", None) or []:
            visit(parent)

    visit(summary)
    return out


# -- the job -------------------------------------------------------------------------------------

def run(cfg: VcmpConfig) -> dict:
    """Mine pairs from cfg.input into cfg.output; returns paths and figures."""
    from aesformer.data import contact_sheet, iter_pairs, read_table
    from aesformer.vcmp import rows as R
    from aesformer.vcmp.report import funnel, funnel_table
    from aesformer.vcmp.state import RunState

    out = cfg.output  # a local folder or a URI (s3://...)
    pairs_dir = storage.join(out, "pairs")
    ray = init_ray(cfg.ray)
    check_cluster(cfg, ray)  # before any model loads or the tracker starts
    tracker = Tracker.start(cfg, "vcmp")
    state = RunState(out)
    t0 = time.perf_counter()
    with tracker.phase("ingest"):
        videos, rejects, listed = ingest(cfg, state)
    state.append({"status": "rejected", "video_id": r["video_id"], "path": r["path"], "reject": r} for r in rejects)
    log.info("ingest: %d files listed, %d to mine, %d rejected, %d finished earlier", listed, len(videos),
             len(rejects), len(state.finished()))

    recorder = Recorder(out, cfg, state)
    wall_pipeline, times = 0.0, {}
    try:
        if videos:
            dataset = build_pipeline(cfg, ray, videos)
            t1 = time.perf_counter()
            with tracker.phase("pipeline"), Progress("vcmp", len(videos), "videos") as recorder.progress, \
                    stage_errors(cfg.ray):
                for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                    for row in R.rows_of(batch):
                        recorder.add(row, len(videos))
            wall_pipeline = time.perf_counter() - t1
            times = stage_times(dataset)
    except BaseException as error:
        tracker.close(error)
        raise
    finally:
        recorder.close()  # flushes what arrived, so finished work is never lost
    if recorder.pending:
        log.warning("%d videos did not finish: %s", len(recorder.pending), ", ".join(sorted(recorder.pending)))

    # -- reports (over everything finished, this run and earlier ones) --
    with tracker.phase("report"):
        table = read_table(pairs_dir, columns=["id", "split"]) if storage.exists(pairs_dir) else None
        n_pairs = 0 if table is None else table.num_rows
        splits = {} if table is None else {s: table.column("split").to_pylist().count(s) for s in ("train", "test")}
        all_rejects = state.rejects()
        records = list(state.finished().values())
        f = funnel(records, all_rejects, listed=len(records) + len(all_rejects), written_pairs=n_pairs, splits=splits)
        f["pipeline_wall_s"] = round(wall_pipeline, 3)
        f["stage_times"] = times
        storage.write_text(storage.join(out, "funnel.json"), json.dumps(f, indent=1))
        text = funnel_table(f)
        storage.write_text(storage.join(out, "funnel.txt"), text + "\n")
        _write_rejects(out, all_rejects)
        sheet = None
        if n_pairs:
            with tempfile.TemporaryDirectory(prefix="vcmp-sheet-") as tmp:
                drawn = contact_sheet(iter_pairs(pairs_dir), Path(tmp) / "contact_sheet.png",
                                      max_pairs=cfg.contact_sheet_pairs)
                sheet = storage.write_bytes(storage.join(out, "contact_sheet.png"), drawn.read_bytes())
        log.info("funnel: %s", text.strip().splitlines()[0] if text.strip() else "empty")
        log.info("funnel:\n%s", text, extra=DETAIL)
    tracker.log_metrics({"videos": f["videos"], "tutorials": f["tutorials"], "pairs": n_pairs,
                         "rejects": len(all_rejects), "vlm_fraction": f["vlm_fraction"],
                         "pipeline_wall_s": wall_pipeline})
    for name in ("funnel.json", "funnel.txt", "rejects.jsonl"):
        tracker.log_artifact(storage.join(out, name))
    if sheet:
        tracker.log_artifact(sheet)
    tracker.close()
    return {"output": out, "pairs_dir": pairs_dir, "dataset": pairs_dir, "pairs": n_pairs,
            "new_videos": len(videos),
            "finished_videos": recorder.finished, "rejects": all_rejects, "funnel": f, "funnel_table": text,
            "contact_sheet": None if sheet is None else str(sheet), "wall_s": round(time.perf_counter() - t0, 3),
            "pipeline_wall_s": round(wall_pipeline, 3), "stage_times": times}


def _write_rejects(out: str, rejects: list[dict]) -> None:
    """The rejects table as JSON lines and Parquet (one row per broken file)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    storage.write_text(storage.join(out, "rejects.jsonl"),
                       "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rejects))
    schema = pa.schema([(k, pa.string()) for k in ("video_id", "path", "stage", "reason", "detail")])
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rejects], schema=schema),
                   buffer)
    storage.write_bytes(storage.join(out, "rejects.parquet"), buffer.getvalue())


def main(argv=None) -> dict:
    return run_job(VcmpConfig, "vcmp", run, argv, check=check_inputs)


if __name__ == "__main__":
    main()

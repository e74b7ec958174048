"""The whole pipeline on the embedded default: local Ray, tiny profile.

Synthetic tutorial videos made from real photographs → VCMP mines (poor,
good) pairs → distillation writes their plans → SFT, then GRPO-A, trains the
thinker → the editor's LoRA is trained → thinker ▶ editor reconstruct the
sample photos. Each stage is the same job you would run alone; this file
only passes one stage's output to the next. At the end it prints where each
result lies and how to look at it.

    python jobs/quickstart.py                       # everything, ~minutes on 2 cores
    python jobs/quickstart.py stages=[samples,vcmp]  # a prefix of the pipeline
    python jobs/quickstart.py stages=[models,samples,vcmp,distill,sft,grpo_a,editor_lora,reconstruct,evaluate]
    python jobs/quickstart.py stages=[evaluate]      # after a run of the others in the same output

``evaluate`` (judged win rates, scores, the report, over the four built-in
systems) runs only when named in ``stages=``: it adds a few minutes on 2 cores.
A stage left out of ``stages=`` reads what an earlier run wrote in the same
``output``, as ``quickstart.json`` records it, and that file keeps every
stage run there.
"""
from __future__ import annotations

if __package__ in (None, ""):
    import _prelude  # noqa: F401  (makes aesformer importable when run as a script)

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aesformer.cluster import init_ray
from aesformer.config import ConfigError, JobConfig
from aesformer.job import run_job, setup_logging
from aesformer.tracking import default_uri

log = logging.getLogger("quickstart")

STAGES = ["models", "samples", "vcmp", "distill", "sft", "grpo_a", "editor_lora", "reconstruct"]
OPTIONAL_STAGES = ["evaluate"]  # run only when named in stages=


@dataclass
class QuickstartConfig(JobConfig):
    output: str = "runs/quickstart"
    # which stages to run, in pipeline order (a later stage reads the earlier ones' output)
    stages: list = field(default_factory=lambda: list(STAGES))
    # synthetic tutorial videos to mine
    videos: int = 6


def _common(cfg: QuickstartConfig, stage: str) -> list[str]:
    """Overrides every stage gets: its output folder, the shared MLflow store, Ray, profile, seed."""
    uri = cfg.tracking.uri or default_uri(cfg.output)
    args = [f"output={Path(cfg.output) / stage}", f"profile={cfg.profile}", f"seed={cfg.seed}",
            f"tracking.uri={uri}", f"tracking.enabled={str(cfg.tracking.enabled).lower()}",
            f"tracking.experiment={cfg.tracking.experiment}", f"models.cache_dir={cfg.models.cache_dir}",
            f"log_level={cfg.log_level}"]
    if cfg.ray.address:
        args.append(f"ray.address={cfg.ray.address}")
    return args


def check_stages(cfg: QuickstartConfig) -> None:
    unknown = [s for s in cfg.stages if s not in STAGES + OPTIONAL_STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(map(str, unknown))}; stages are "
                          f"{', '.join(STAGES + OPTIONAL_STAGES)}")


def run(cfg: QuickstartConfig) -> dict:
    check_stages(cfg)
    out = Path(cfg.output)
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    # a stage left out this time reads what an earlier run of it wrote here
    earlier = _earlier_run(out)
    init_ray(cfg.ray)

    def stage(name: str, fn, *extra: str) -> dict:
        if name not in cfg.stages:
            return earlier["stages"].get(name) or {}
        log.info("stage %s", name)
        t0 = time.perf_counter()
        results[name] = fn(_common(cfg, name) + list(extra)) or {}
        setup_logging(cfg.log_level, out / "logs" / "quickstart.log")  # the stage had its own log file
        timings[name] = round(time.perf_counter() - t0, 1)
        log.info("stage %s done in %.1fs", name, timings[name])
        return results[name]

    from aesformer.tiny import ensure_tiny_models

    stage("models", lambda _args: ensure_tiny_models(cfg.models.cache_dir) if cfg.profile == "tiny" else {})

    from aesformer.jobs import make_samples, vcmp

    samples = stage("samples", make_samples.main, f"videos={cfg.videos}")
    videos = samples.get("videos_dir") or str(out / "samples")
    mined = stage("vcmp", vcmp.main, f"input={videos}")
    pairs = mined.get("dataset") or str(out / "vcmp")

    from aesformer.jobs import distill

    distilled = stage("distill", distill.main, f"input={pairs}")
    planned = distilled.get("dataset") or str(out / "distill" / "pairs")

    from aesformer.jobs import sft

    tuned = stage("sft", sft.main, f"data={planned}")
    sft_model = tuned.get("export") or str(out / "sft" / "export" / "merged")

    from aesformer.jobs import grpo_a

    rl = stage("grpo_a", grpo_a.main, f"data={planned}", f"init={sft_model}")
    thinker = rl.get("model") or sft_model

    from aesformer.jobs import editor_lora, reconstruct

    lora = stage("editor_lora", editor_lora.main, f"data={planned}")
    lora_dir = lora.get("lora") or str(out / "editor_lora" / "lora")
    stage("reconstruct", reconstruct.main, f"input={planned}",
          f"models.thinker={thinker}", f"lora={lora_dir}")

    from aesformer.jobs import evaluate

    # the quickstart's few pairs: evaluate a handful of them whatever their split, every
    # comparison in both A/B orders (the identity baseline then scores 50% against the poor photo)
    stage("evaluate", lambda args: _brief(evaluate.main(args)), f"data={planned}", "split=null", "limit=4",
          "judge.both_orders=1.0", f"trained_thinker={thinker}", f"lora={lora_dir}")

    # quickstart.json keeps the stages of earlier runs here that this one did not redo, in pipeline order
    order = STAGES + OPTIONAL_STAGES
    kept, kept_timings = {**earlier["stages"], **results}, {**earlier["timings_s"], **timings}
    summary = {"output": str(out.resolve()),
               "timings_s": {k: kept_timings.get(k) for k in order if k in kept},
               "stages": {k: kept[k] for k in order if k in kept}}
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2, default=str))
    print(_where_things_are(cfg, results, timings))
    return summary


def _earlier_run(out: Path) -> dict:
    """{"stages", "timings_s"} of the quickstart runs before this one in ``out`` (empty when none)."""
    try:
        earlier = json.loads((out / "quickstart.json").read_text())
        return {"stages": dict(earlier.get("stages") or {}), "timings_s": dict(earlier.get("timings_s") or {})}
    except (OSError, ValueError):
        return {"stages": {}, "timings_s": {}}


def _brief(result: dict) -> dict:
    """The evaluate job's result without the nested summary (quickstart.json stays readable)."""
    return {k: v for k, v in result.items() if k not in ("summary", "scorers")}


def _stage_line(name: str, res: dict) -> tuple[str, str]:
    """(what the stage produced, where it lies) in a few words."""
    def count(value: Any) -> Any:
        return len(value) if isinstance(value, (list, tuple, dict)) else value

    if name == "models":
        return f"{len(res)} tiny models", str(Path(next(iter(res.values()))).parent) if res else ""
    if name == "samples":
        return f"{count(res.get('videos'))} tutorial videos", res.get("videos_dir", "")
    if name == "vcmp":
        return f"{res.get('pairs')} pairs from {res.get('finished_videos')} videos", res.get("dataset", "")
    if name == "distill":
        summary = res.get("summary") or {}
        return f"{summary.get('accepted')} plans accepted", res.get("dataset", "")
    if name == "sft":
        return f"{res.get('step')} steps", res.get("export") or res.get("checkpoint", "")
    if name == "grpo_a":
        reward = (res.get("metrics") or {}).get("reward_mean")
        return (f"{res.get('last_step')} steps" + (f", reward {reward:.3f}" if reward is not None else ""),
                res.get("model") or res.get("checkpoint", ""))
    if name == "editor_lora":
        losses = res.get("losses") or []
        first, last = (sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:])) if losses else (0, 0)
        return f"{res.get('steps')} steps, loss {first:.2f} → {last:.2f}", res.get("lora", "")
    if name == "reconstruct":
        return f"{res.get('ok')} photos reconstructed", str(Path(res.get("output", "")) / "images")
    if name == "evaluate":
        return f"{res.get('photos')} photos, {res.get('judge_asked')} judgements", res.get("html", "")
    return "", str(res.get("output", ""))


def _where_things_are(cfg: QuickstartConfig, results: dict, timings: dict) -> str:
    out = Path(cfg.output).resolve()
    uri = cfg.tracking.uri or default_uri(out)
    lines = ["", f"AesFormer quickstart finished in {sum(timings.values()):.0f}s.", ""]
    for name, res in results.items():
        what, where = _stage_line(name, res)
        lines.append(f"  {name:<12} {timings.get(name, 0):>5.0f}s  {what:<34} {where}")
    first = [("the mined pairs", results.get("vcmp", {}).get("contact_sheet")),
             ("the reconstructions", results.get("reconstruct", {}).get("contact_sheet"))]
    plans = out / "reconstruct" / "plans"
    plan = next(iter(sorted(plans.glob("*.txt"))), None) if plans.is_dir() else None
    first.append(("a plan the thinker wrote", str(plan) if plan else None))
    first.append(("the evaluation report", results.get("evaluate", {}).get("html")))
    lines += ["", "Open first:"]
    lines += [f"  {label + ':':<26} {path}" for label, path in first if path]
    lines += [f"  {'every run, in MLflow:':<26} mlflow ui --backend-store-uri {uri}",
              f"  {'logs and configs:':<26} {out}/<stage>/logs/, {out}/<stage>/config.yaml"]
    if cfg.profile == "tiny":
        lines += ["", "The tiny profile's models are small and random by design: the run proves the pipeline, not",
                  "the pictures. The tiny editor paints noise; profile=a40 uses the paper's models."]
    return "\n".join(lines + [""])


def main(argv=None) -> dict:
    return run_job(QuickstartConfig, "quickstart", run, argv, check=check_stages)


if __name__ == "__main__":
    main()

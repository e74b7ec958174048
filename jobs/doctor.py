"""Check a Ray cluster before a long run: can its workers import this
project (installed or shipped as a wheel), what Python, torch and GPUs do
they have, do a task and an actor both run, and does every node find each
model the profile names (``models.*``)? Writes output/doctor.json, with
what is missing per node.

    python jobs/doctor.py
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/doctor.py output=/tmp/doctor
"""
from __future__ import annotations

if __package__ in (None, ""):
    import _prelude  # noqa: F401  (makes aesformer importable when run as a script)

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from aesformer.cluster import init_ray
from aesformer.config import JobConfig
from aesformer.job import run_job
from aesformer.tracking import Tracker

log = logging.getLogger("doctor")


@dataclass
class DoctorConfig(JobConfig):
    output: str = "runs/doctor"
    # matrix size of the actor's checksum computation
    matmul_n: int = 64


def run(cfg: DoctorConfig) -> dict:
    from aesformer.actors.doctor import NodeProbe, describe_worker, matmul_checksum, probe_task

    with Tracker.start(cfg, "doctor") as tracker:
        ray = init_ray(cfg.ray)
        with tracker.phase("probe"):
            task_info = ray.get(probe_task.remote(), timeout=300)
            probe = NodeProbe.remote()
            actor_info = ray.get(probe.describe.remote(), timeout=300)
            checksum = ray.get(probe.matmul_checksum.remote(cfg.matmul_n, cfg.seed), timeout=300)
            ray.kill(probe)
        with tracker.phase("models"):
            models = model_report(cfg, ray)
        expected = matmul_checksum(cfg.matmul_n, cfg.seed)
        report = {
            "driver": describe_worker(),
            "task": task_info,
            "actor": actor_info,
            "cluster_resources": {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")},
            "actor_checksum_matches_driver": abs(checksum - expected) <= 1e-3 * max(1.0, abs(expected)),
        }
        report["models"] = models
        report["models_missing"] = [f"{node}: {key} ({problem})" for node, found in sorted(models.items())
                                    for key, problem in found.items() if problem]
        for line in report["models_missing"]:
            log.warning("model missing on %s", line)
        report["ok"] = bool(report["actor_checksum_matches_driver"] and not report["models_missing"]
                            and task_info["aesformer_version"] == actor_info["aesformer_version"])
        path = Path(cfg.output) / "doctor.json"
        path.write_text(json.dumps(report, indent=2))
        tracker.log_artifact(path)
        tracker.log_metrics({"ok": float(report["ok"]), "cluster_cpus": report["cluster_resources"].get("CPU", 0)})
    log.info("doctor: %s; report at %s", "OK" if report["ok"] else "PROBLEMS", path)
    return {"report": str(path), "ok": report["ok"]}


def model_report(cfg: DoctorConfig, ray) -> dict:
    """{node: {models.<key>: problem or None}} for the models the profile
    names, checked on the driver and from every node of the cluster."""
    from aesformer.models import ModelNotFoundError, check_models_on_nodes, resolve_model

    resolved, driver = {}, {}
    for key in ("thinker", "judge", "editor"):
        name = getattr(cfg.models, key)
        try:
            resolved[f"models.{key}"] = resolve_model(name, cfg.models.cache_dir, f"models.{key}")
        except ModelNotFoundError as e:
            driver[f"models.{key}"] = str(e)
    report = check_models_on_nodes(ray, resolved)
    for found in report.values():
        found.update(driver)
    return report


def main(argv=None) -> dict:
    return run_job(DoctorConfig, "doctor", run, argv)


if __name__ == "__main__":
    raise SystemExit(0 if main()["ok"] else 1)

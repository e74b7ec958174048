"""Cluster definitions: the KubeRay manifests hold only fields of KubeRay's
API (v1.7, the version README.md names), each RayJob's entrypoint is a job
that accepts every key it passes, the pods request the GPUs the a40
profile's plan needs and mount the shared storage, and the Ray cluster
launcher config passes the schema shipped in the ray package."""
from __future__ import annotations

import copy
import importlib
import json
import math
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
JOBS = {"grpo_a": "GrpoAConfig", "sft": "SFTConfig", "distill": "DistillConfig", "vcmp": "VcmpConfig",
        "editor_lora": "EditorLoraConfig", "reconstruct": "ReconstructConfig"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def kuberay_schema() -> dict:
    return json.loads((KUBERAY / "schema.json").read_text())


def cluster_spec(manifest: dict) -> dict:
    spec = manifest["spec"]
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
            "RayService": lambda: spec["rayClusterConfig"]}[manifest["kind"]]()


def pods_of(spec: dict) -> list[tuple[dict, int]]:
    """(pod spec, how many) for the head and each worker group (at most replicas)."""
    out = [(spec["headGroupSpec"]["template"]["spec"], 1)]
    for group in spec.get("workerGroupSpecs", []):
        out.append((group["template"]["spec"], group.get("maxReplicas", group.get("replicas", 0))))
    return out


def gpus_of(spec: dict, at_least: bool = True) -> int:
    """GPUs of the cluster: every group at minReplicas (or at most maxReplicas)."""
    total = 0
    for group in spec.get("workerGroupSpecs", []):
        n = group.get("minReplicas", group.get("replicas", 0)) if at_least else group.get("maxReplicas", 0)
        per_pod = sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
                      for c in group["template"]["spec"]["containers"])
        total += n * per_pod
    return total


def job_config(job: str, args: list[str]):
    from aesformer.config import load_config

    module = importlib.import_module(f"aesformer.jobs.{job}")
    return load_config(getattr(module, JOBS[job]), job, args)


def gpu_plan(job: str, cfg) -> int:
    """GPUs the job's pools and workers hold at once in its config."""
    up = lambda v: max(v) if isinstance(v, (list, tuple)) else v  # noqa: E731  elastic [min, max]
    if job == "grpo_a":
        from aesformer.jobs.grpo_a import gpus_needed

        return gpus_needed(cfg)
    if job == "sft":
        return up(cfg.num_workers) if cfg.use_gpu else 0
    if job == "distill":
        t, v, w = cfg.teacher.local, cfg.validator.local, cfg.transcript
        return math.ceil(t.num_actors * t.num_gpus + v.num_actors * v.num_gpus + w.num_actors * w.num_gpus)
    if job == "vcmp":
        return math.ceil(sum(p.size * p.num_gpus for p in vars(cfg.pools).values()))
    if job == "editor_lora":  # the cache encoders finish before training starts
        train = (up(cfg.num_workers) if cfg.use_gpu else 0) + cfg.validation.num_gpus
        return math.ceil(max(cfg.cache.pool_size * cfg.cache.num_gpus, train))
    if job == "reconstruct":
        th, ed = cfg.thinker, cfg.editor
        return math.ceil(th.pool * th.num_gpus * th.tensor_parallel + ed.pool * ed.num_gpus)
    raise KeyError(job)


def test_the_kuberay_schema_is_a_valid_json_schema_and_rejects_a_misspelt_field():
    schema = kuberay_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    manifest = load(KUBERAY / "rayjob-grpo-a.yaml")
    jsonschema.validate(manifest, schema)
    broken = copy.deepcopy(manifest)
    broken["spec"]["shutdownAfterJobFinish"] = broken["spec"].pop("shutdownAfterJobFinishes")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    broken = copy.deepcopy(manifest)
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"] = {"num-gpus": 8}  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_holds_only_kuberay_fields_and_mounts_the_shared_storage(path):
    manifest = load(path)
    jsonschema.validate(manifest, kuberay_schema())
    for pod, _ in pods_of(cluster_spec(manifest)):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                  if "persistentVolumeClaim" in v}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert claims.get(mounts.get("/shared")) == "aesformer-shared", (path.name, container["name"])


def test_there_is_one_rayjob_per_gpu_job_and_a_raycluster():
    kinds = [(load(p)["kind"], p.name) for p in MANIFESTS]
    jobs = sorted(shlex.split(load(p)["spec"]["entrypoint"])[1] for p in MANIFESTS if load(p)["kind"] == "RayJob")
    assert jobs == sorted(f"jobs/{j}.py" for j in JOBS)
    assert ("RayCluster", "raycluster.yaml") in kinds


@pytest.mark.parametrize("path", [p for p in MANIFESTS if p.name.startswith("rayjob-")], ids=lambda p: p.name)
def test_each_rayjob_runs_an_existing_job_with_keys_it_accepts_on_the_gpus_its_plan_needs(path):
    manifest = load(path)
    argv = shlex.split(manifest["spec"]["entrypoint"])
    assert argv[0] == "python" and (ROOT / argv[1]).is_file(), argv[:2]
    job = Path(argv[1]).stem
    cfg = job_config(job, argv[2:])  # an unknown key or a bad value raises ConfigError here
    assert cfg.profile == "a40"
    spec = manifest["spec"]["rayClusterSpec"]
    assert gpus_of(spec) >= gpu_plan(job, cfg) > 0, (path.name, gpus_of(spec), gpu_plan(job, cfg))
    assert spec["headGroupSpec"]["rayStartParams"].get("num-gpus") == "0"  # the driver's head holds no GPU


def test_the_raycluster_fits_the_largest_plan_when_scaled_out():
    spec = cluster_spec(load(KUBERAY / "raycluster.yaml"))
    largest = max(gpu_plan(job, job_config(job, ["profile=a40"])) for job in JOBS)
    assert gpus_of(spec, at_least=False) >= largest == 21  # VCMP with the 72B screening VLM and the learned scorers


def test_grpo_a_gpu_plan_counts_every_pool():
    cfg = job_config("grpo_a", ["profile=a40"])
    # 3 rollout + 2 judges x 2 + 1 reference + 8 learner
    assert gpu_plan("grpo_a", cfg) == 16
    cfg = job_config("grpo_a", ["profile=a40", "reward.alignment=rule", "reward.weights=[0.5,0.5,0]"])
    assert gpu_plan("grpo_a", cfg) == 12  # no judge needed


def test_the_launcher_config_describes_on_premise_a40_nodes_and_passes_rays_schema():
    import os

    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(ROOT / "cluster" / "a40.yaml")
    schema = json.loads(Path(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` checks after filling defaults
    provider = config["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and len(provider["worker_ips"]) == 3
    assert "--num-gpus=0" in " ".join(config["head_start_ray_commands"])
    assert "-v /shared:/shared" in config["docker"]["run_options"]


def test_the_image_prebuilds_deepspeeds_ops_and_installs_once_with_the_gpu_constraints():
    docker = (ROOT / "cluster" / "Dockerfile").read_text()
    gpu = {line.split("==")[0].lower(): line.split("==")[1].strip()
           for line in (ROOT / "constraints-gpu.txt").read_text().splitlines() if "==" in line}
    assert gpu["torch"] == "2.14.0" and gpu["vllm"] == "0.33.0" and gpu["transformers"].startswith("5.20.")
    assert "cuda:13.0" in docker  # torch 2.14.0's wheels are built against CUDA 13.0
    assert "DS_BUILD_CPU_ADAM=1" in docker and "DS_BUILD_FUSED_ADAM=1" in docker
    installs = [line for line in docker.splitlines() if "pip install" in line and "-c constraints-gpu.txt" in line]
    assert len(installs) == 1 and "requirements.txt" in installs[0]
    assert "constraints.txt" not in docker.replace("constraints-gpu.txt", "")  # never the CPU pins

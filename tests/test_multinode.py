"""Jobs on a simulated cluster whose nodes have their own disks: a head
without GPUs that runs the driver, and worker nodes node_b and node_c, each
in its own mount namespace with a private /tmp (cluster/local_cluster.py).
A folder outside /tmp (the cluster's ``shared``) stands for a shared
filesystem, and a real S3 endpoint on 127.0.0.1 (moto's server) for object
storage: every node gets its credentials and endpoint in its environment, and
a cache of its own in its private /tmp for the models it copies from S3.
One cluster for the module; every process has a timeout."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from helpers import PYTHON, REPO, local_cluster_module, mlflow_server, s3_server

pytestmark = pytest.mark.slow

lc = local_cluster_module()
_ok, _why = lc.namespaces_available()
if not _ok:
    pytest.skip(f"multi-node tests need mount namespaces: {_why}", allow_module_level=True)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The S3 endpoint, started before the cluster so every node's environment names it."""
    folder = tmp_path_factory.mktemp("s3")
    with s3_server(folder) as server:
        yield {**server, "folder": folder}


@pytest.fixture(scope="module")
def cluster(s3):
    env = {**os.environ, **s3["env"], "AESFORMER_MODEL_CACHE": f"/tmp/aesf-model-cache-{os.getpid()}"}
    c = lc.LocalCluster({"node_b": {"num_cpus": 4}, "node_c": {"num_cpus": 4}}, head_cpus=1, env=env)
    t0 = time.time()
    c.start(timeout=600)
    c.started_in = time.time() - t0
    yield c
    c.stop()
    c.cleanup()


@pytest.fixture(scope="module")
def tracking(s3):
    """An MLflow tracking server on the head: SQLite on the head's disk,
    artifacts on the S3 endpoint."""
    with mlflow_server(s3["folder"], f"s3://{s3['bucket']}/mlflow", s3["env"]) as uri:
        yield {"uri": uri, **s3}


def job(cluster, script, args, timeout):
    """A job's driver on the head (this machine's namespace), joined to the cluster."""
    env = dict(cluster.env, OMP_NUM_THREADS="1")
    return subprocess.run([PYTHON, script, f"ray.address={cluster.address}"] + args, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


PINNED = ["learner.resources={node_b: 1}", "rollout.resources={node_c: 1}", "reward.resources={node_c: 1}",
          "reference.resources={node_c: 1}"]


@pytest.mark.timeout(1800)  # includes starting the cluster, slow on a busy machine
def test_a_file_a_worker_node_writes_to_its_disk_is_seen_by_that_node_only(cluster, tmp_path):
    probe = tmp_path / "written-on-node_b.txt"
    code = f"""
import os, ray
ray.init(address="{cluster.address}", logging_level="ERROR")
def write(p):
    os.makedirs(os.path.dirname(p), exist_ok=True)
    open(p, "w").write("b")
def sees(p):
    return os.path.exists(p)
on = lambda node: {{"num_cpus": 0, "resources": {{node: 1}}}}
ray.get(ray.remote(write).options(**on("node_b")).remote("{probe}"))
print(ray.get(ray.remote(sees).options(**on("node_b")).remote("{probe}")),
      ray.get(ray.remote(sees).options(**on("node_c")).remote("{probe}")), os.path.exists("{probe}"))
"""
    out = subprocess.run([PYTHON, "-c", code], env=cluster.env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-3:] == ["True", "False", "False"]  # node_b, node_c, the head
    assert not probe.exists()
    assert cluster.in_node("node_b", ["cat", str(probe)]).stdout == "b"
    assert cluster.in_node("node_c", ["cat", str(probe)]).returncode != 0


@pytest.mark.timeout(600)
def test_a_node_local_output_fails_before_any_work_and_says_what_to_use(cluster, tmp_path):
    out = tmp_path / "grpo"  # /tmp: private to each node
    t0 = time.time()
    proc = job(cluster, "jobs/grpo_a.py", ["profile=tiny", f"output={out}", "tracking.enabled=false"] + PINNED, 300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "is on this node's disk only: node(s) node_b, node_c" in proc.stderr
    assert "Use a folder every node mounts" in proc.stderr
    assert not (out / "checkpoints").exists() and not (out / "steps.jsonl").exists()
    print(f"refused in {time.time() - t0:.1f}s")


@pytest.mark.timeout(600)
def test_a_sqlite_tracking_store_is_refused_on_several_nodes(cluster):
    out = cluster.shared / "grpo-sqlite"
    proc = job(cluster, "jobs/grpo_a.py", ["profile=tiny", f"output={out}"] + PINNED, 300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "is a store on this node's disk, and this cluster has 3 nodes" in proc.stderr
    assert "mlflow server" in proc.stderr
    assert not (out / "mlflow").exists()


@pytest.mark.timeout(600)
def test_a_model_folder_only_the_head_has_fails_before_loading_naming_the_nodes(cluster, tmp_path, tiny_models):
    import shutil

    local = tmp_path / "thinker"  # /tmp: the worker nodes do not see it
    shutil.copytree(tiny_models["thinker"], local)
    out = cluster.shared / "grpo-models"
    proc = job(cluster, "jobs/grpo_a.py", ["profile=tiny", f"output={out}", "tracking.enabled=false", f"init={local}"]
               + PINNED, 300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "models missing on the cluster's nodes" in proc.stderr
    assert f"node_b: init (folder {local} does not exist on this node)" in proc.stderr
    assert f"node_c: init (folder {local} does not exist on this node)" in proc.stderr
    assert "head: init" not in proc.stderr and "models.judge" not in proc.stderr
    assert not (out / "steps.jsonl").exists()


@pytest.mark.timeout(1800)
def test_grpo_a_with_the_learner_on_a_worker_node_checkpoints_on_a_shared_folder(cluster, tracking):
    """One uninterrupted run (stopping and resuming is the S3 test's)."""
    out = cluster.shared / "grpo"
    common = ["profile=tiny", f"output={out}", f"tracking.uri={tracking['uri']}", "tracking.experiment=multinode",
              "steps=3"] + PINNED
    t0 = time.time()
    proc = job(cluster, "jobs/grpo_a.py", common, 900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    print(f"a GRPO-A run on the cluster: {time.time() - t0:.0f}s (cluster start {cluster.started_in:.0f}s)")
    assert json.loads((out / "checkpoints" / "step-000002" / "trainer_state.json").read_text())["step"] == 2
    result = json.loads((out / "result.json").read_text())
    assert result["finished"] and result["last_step"] == 3
    # the learner ranks ran on node_b, the other pools on node_c, the driver on the head
    assert result["placement"]["learner"] == {"strategy": "STRICT_PACK", "nodes": ["node_b", "node_b"]}
    assert set(result["placement"]["rollout"]["nodes"]) == {"node_c"}
    steps = [json.loads(line)["step"] for line in (out / "steps.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert (out / "model" / "config.json").exists()
    # tracked on the server, its artifacts on S3
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking["uri"])
    runs = client.search_runs([client.get_experiment_by_name("multinode").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "reward_mean")] == [1, 2, 3]
    import boto3

    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=tracking["endpoint"], aws_access_key_id="testing",
                                           aws_secret_access_key="testing", region_name="us-east-1")
            .list_objects_v2(Bucket=tracking["bucket"]).get("Contents", [])]
    assert any(k.startswith("mlflow/") and k.endswith("config.yaml") for k in keys)


def s3_keys(s3, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3["endpoint"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"], Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.mark.timeout(1800)
def test_grpo_a_with_the_learner_on_a_worker_node_checkpoints_and_resumes_on_s3(cluster, tracking, monkeypatch):
    out = f"s3://{tracking['bucket']}/grpo-s3"
    common = ["profile=tiny", f"output={out}", f"tracking.uri={tracking['uri']}", "tracking.experiment=multinode-s3",
              "steps=3", "val_every=0", "learner.zero_stage=3"] + PINNED  # ZeRO-3 partitions on S3
    t0 = time.time()
    first = job(cluster, "jobs/grpo_a.py", common + ["stop_after=2"], 900)
    assert first.returncode == 0, first.stderr[-5000:]
    keys = s3_keys(tracking, "grpo-s3/")
    assert "grpo-s3/checkpoints/step-000002/trainer_state.json" in keys
    # both learner ranks (on node_b) uploaded their ZeRO-3 partitions
    assert sum("step-000002/" in k and "zero_pp_rank_" in k for k in keys) >= 4, keys
    second = job(cluster, "jobs/grpo_a.py", common + ["resume=auto"], 900)
    assert second.returncode == 0, second.stderr[-5000:]
    print(f"two GRPO-A runs on the cluster, output on S3: {time.time() - t0:.0f}s")

    from aesformer import storage

    for k, v in tracking["env"].items():  # this process reads the results back from S3
        monkeypatch.setenv(k, v)
    result = storage.read_json(f"{out}/result.json")
    assert result["finished"] and result["last_step"] == 3
    assert result["resumed_from"] == f"{out}/checkpoints/step-000002"
    assert result["placement"]["learner"] == {"strategy": "STRICT_PACK", "nodes": ["node_b", "node_b"]}
    assert [json.loads(x)["step"] for x in storage.read_text(f"{out}/steps.jsonl").splitlines()] == [1, 2, 3]
    assert storage.listdir(f"{out}/checkpoints") == ["step-000002", "step-000003"]
    assert storage.exists(f"{out}/model/config.json") and storage.exists(f"{out}/logs/grpo_a.log")
    assert storage.exists(f"{out}/config.yaml") and storage.exists(f"{out}/init_policy/config.json")
    # the dataset the tiny profile made went to S3 too; the resumed run restored the checkpoint's weights
    assert storage.listdir(f"{out}/data") == ["part-00000.parquet"]
    state = storage.read_json(f"{out}/checkpoints/step-000002/trainer_state.json")
    assert result["resumed_weights_sha256"] == state["weights_sha256"]
    # the policy with the plan tokens went to S3 once; each worker node loaded it from its own cache,
    # the head (driver) never copied it
    cache = cluster.env["AESFORMER_MODEL_CACHE"]
    for node in ("node_b", "node_c"):
        listing = cluster.in_node(node, ["ls", cache]).stdout.split()
        assert any(name.startswith("init_policy-") for name in listing), (node, listing)
    assert not os.path.exists(cache)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking["uri"])
    runs = client.search_runs([client.get_experiment_by_name("multinode-s3").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "reward_mean")] == [1, 2, 3]


@pytest.mark.timeout(600)
def test_vcmp_refuses_videos_only_the_head_has_before_any_work(cluster, tmp_path):
    videos = tmp_path / "videos"  # /tmp: the worker nodes, whose workers decode the videos, do not see it
    videos.mkdir()
    out = cluster.shared / "vcmp-local-input"
    proc = job(cluster, "jobs/vcmp.py", [f"input={videos}", f"output={out}", "tracking.enabled=false"], 300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"input='{videos}' is on this node's disk only: node(s) node_b, node_c" in proc.stderr
    assert "s3://" in proc.stderr
    assert not (out / "pairs").exists() and not (out / "state").exists()

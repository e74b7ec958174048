"""A node lost in the middle of a run, on a simulated cluster: a head that
runs the driver and worker nodes node_b and node_c, each in its own mount
namespace with a private /tmp (cluster/local_cluster.py). Losing a node
kills its raylet, workers and agents at once (SIGKILL by process group).
Checkpoints live in the cluster's shared folder, which every node sees.

The head has no CPUs for work (the driver needs none), so every actor and
task runs on a worker node, and a pool that is not pinned to one may be
placed, and placed again, on either. One cluster for the module; a node
lost by a test is brought back (a fresh node of the same name) before the
next."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from helpers import PYTHON, REPO, local_cluster_module

pytestmark = pytest.mark.slow

lc = local_cluster_module()
_ok, _why = lc.namespaces_available()
if not _ok:
    pytest.skip(f"node-loss tests need mount namespaces: {_why}", allow_module_level=True)


@pytest.fixture(scope="module")
def cluster():
    c = lc.LocalCluster({"node_b": {"num_cpus": 4}, "node_c": {"num_cpus": 4}}, head_cpus=0)
    c.start(timeout=600)
    yield c
    c.stop()
    c.cleanup()


@pytest.fixture
def nodes(cluster):
    """The cluster, with any node a test lost brought back after it."""
    yield cluster
    for name in sorted(cluster.lost):
        cluster.restart_node(name, timeout=600)


# Small CPU asks: every pool of the tiny profile (3 CPUs in all) fits on one worker node.
GRPO = ["profile=tiny", "tracking.enabled=false", "val_every=0", "export_model=false",
        "learner.cpus_per_worker=0.5", "rollout.cpus_per_actor=0.5", "reward.cpus_per_actor=0.5",
        "reference.cpus_per_actor=0.5"]


def start_job(cluster, script: str, args: list[str], log: Path) -> subprocess.Popen:
    """A job's driver on the head, joined to the cluster, in the background."""
    env = dict(cluster.env, OMP_NUM_THREADS="1")
    return subprocess.Popen([PYTHON, script, f"ray.address={cluster.address}"] + args, cwd=REPO, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_for(what, proc: subprocess.Popen, log: Path, timeout: float = 900):
    """Poll ``what()`` until it returns something truthy; fail when the job ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = what()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"the job ended ({proc.returncode}) first: {log.read_text()[-4000:]}")
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"timed out waiting: {log.read_text()[-4000:]}")


def steps(out: Path) -> list[dict]:
    path = out / "steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def checkpointed(out: Path, step: int) -> bool:
    return (out / "checkpoints" / f"step-{step:06d}" / "trainer_state.json").exists()


def node_of(label: str) -> str:
    """node_b or node_c from a node's label (its custom resources)."""
    return next(part for part in label.split(",") if part.startswith("node_"))


def prompt_order(data: str, seed: int, per_step: int, count: int) -> list[list[str]]:
    """The prompts each step of an uninterrupted run takes, from the job's own data order."""
    import tempfile

    from aesformer.jobs.grpo_a import Prompts

    with tempfile.TemporaryDirectory() as tmp:
        train = Prompts(Path(data), "train", seed, "instruction", Path(tmp) / "quarantine.jsonl")
        return [train.take(i * per_step, per_step) for i in range(count)]


@pytest.mark.timeout(1800)
def test_grpo_a_restarts_a_lost_learner_group_from_its_checkpoint_and_ends_as_an_uninterrupted_run(nodes, tmp_path):
    out = nodes.shared / "grpo-learner-lost"
    log = tmp_path / "job.log"
    t0 = time.time()
    # steps take a few seconds once the pools are up: enough of them that the loss lands mid-run
    proc = start_job(nodes, "jobs/grpo_a.py", GRPO + [f"output={out}", "steps=8", "checkpoint_every=2"], log)
    wait_for(lambda: checkpointed(out, 2), proc, log)
    learner = [node_of(n) for n in steps(out)[-1]["nodes"]["learner"]]
    assert len(set(learner)) == 1  # the group sits on one node
    lost = learner[0]
    nodes.kill_node(lost)  # a step or two after the checkpoint
    t_kill = time.time()
    assert proc.wait(timeout=1200) == 0, log.read_text()[-5000:]
    print(f"learner node lost at {t_kill - t0:.0f}s, run done {time.time() - t_kill:.0f}s later")

    result = json.loads((out / "result.json").read_text())
    assert result["finished"] and result["last_step"] == 8
    records = steps(out)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["prompt_ids"] for r in records] == prompt_order(result["data"], 42, 2, 8)
    learner_recoveries = [r for r in result["recoveries"] if r["kind"] == "learner"]
    assert len(learner_recoveries) == 1, result["recoveries"]
    recovery = learner_recoveries[0]
    restored = int(Path(recovery["from_checkpoint"]).name.removeprefix("step-"))
    assert restored in (2, 4, 6)
    assert recovery["steps_redone"] == recovery["lost_at_step"] - restored <= 2  # at most checkpoint_every
    survivor = {"node_b": "node_c", "node_c": "node_b"}[lost]
    assert {node_of(n) for n in records[-1]["nodes"]["learner"]} == {survivor}
    assert "learner group restarted (1 of at most 2)" in log.read_text()
    print(f"steps redone: {recovery['steps_redone']}; recovery took {recovery['seconds']}s; "
          f"pool actors replaced: {sum(r['kind'] == 'pool' for r in result['recoveries'])}")


HOLD = """
import sys, ray
from ray.util.placement_group import placement_group, remove_placement_group
ray.init(address=sys.argv[1], logging_level="ERROR")
pg = placement_group([{"CPU": float(sys.argv[3]), sys.argv[2]: 1}])
ray.get(pg.ready(), timeout=300)
print("held", flush=True)
sys.stdin.read()
remove_placement_group(pg)
"""


@pytest.mark.timeout(1800)
def test_grpo_a_places_the_pools_of_a_lost_node_again_on_the_survivor_and_finishes_every_step(nodes, tmp_path):
    # another job holds node_b's spare CPUs while this one starts, so its pools go to node_c
    hold = subprocess.Popen([PYTHON, "-c", HOLD, nodes.address, "node_b", "3"], env=nodes.env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert hold.stdout.readline().strip() == "held"
        out = nodes.shared / "grpo-pools-lost"
        log = tmp_path / "job.log"
        proc = start_job(nodes, "jobs/grpo_a.py", GRPO + [f"output={out}", "steps=6", "checkpoint_every=2",
                                                          "learner.resources={node_b: 1}"], log)
        first = wait_for(lambda: steps(out), proc, log)[0]
        t_kill = time.time()
        nodes.kill_node("node_c")  # during step 2
    finally:
        hold.stdin.close()  # the other job ends: node_b has room again
        hold.wait(timeout=120)
    placed = {pool: {node_of(n) for n in where} for pool, where in first["nodes"].items()}
    assert placed == {"learner": {"node_b"}, "rollout": {"node_c"}, "reward": {"node_c"}, "reference": {"node_c"}}
    assert proc.wait(timeout=1200) == 0, log.read_text()[-5000:]
    print(f"pool node lost; run done {time.time() - t_kill:.0f}s later")

    result = json.loads((out / "result.json").read_text())
    assert result["finished"] and result["last_step"] == 6
    records = steps(out)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [r["prompt_ids"] for r in records] == prompt_order(result["data"], 42, 2, 6)
    assert not [r for r in result["recoveries"] if r["kind"] == "learner"]  # the learner never stopped
    replaced = [r for r in result["recoveries"] if r["kind"] == "pool"]
    assert sorted((r["pool"].rsplit("-", 1)[-1], r["actor"]) for r in replaced) == [
        ("reference", 0), ("reward", 0), ("rollout", 0), ("rollout", 1)]
    assert all(node_of(r["now_on"]) == "node_b" and r["steps_redone"] == 0 for r in replaced)
    assert {pool: {node_of(n) for n in where} for pool, where in records[-1]["nodes"].items()} == {
        "learner": {"node_b"}, "rollout": {"node_b"}, "reward": {"node_b"}, "reference": {"node_b"}}
    print(f"pool actors replaced: {len(replaced)} in {[r['seconds'] for r in replaced]}s; steps redone: 0")


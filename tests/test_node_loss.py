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

import contextlib
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
    """The cluster, with any node an earlier test lost brought back first (the
    module's last loss is never brought back: the cluster stops)."""
    for name in sorted(cluster.lost):
        cluster.restart_node(name, timeout=600)
    return cluster


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
        ("reference", 0), ("reward", 0), ("rollout", 0)]
    assert all(node_of(r["now_on"]) == "node_b" and r["steps_redone"] == 0 for r in replaced)
    assert {pool: {node_of(n) for n in where} for pool, where in records[-1]["nodes"].items()} == {
        "learner": {"node_b"}, "rollout": {"node_b"}, "reward": {"node_b"}, "reference": {"node_b"}}
    print(f"pool actors replaced: {len(replaced)} in {[r['seconds'] for r in replaced]}s; steps redone: 0")



# -- Ray Train jobs: a worker group of one or two ([1, 2], elastic) ------------------------------

def trained_steps(out: Path) -> list[int]:
    """The optimizer steps rank 0 took, in order, a redone step again (the job's sample log)."""
    path = out / "sample_log" / "rank0.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def train_worker_nodes(cluster) -> list[str]:
    """The worker nodes a Ray Train worker runs on now."""
    return [name for name in ("node_b", "node_c")
            if name not in cluster.lost and cluster.processes(name, "RayTrainWorker")]


SFT = ["profile=tiny", "tracking.enabled=false", "export=false", "num_workers=[1,2]", "max_failures=1",
       "sample_log=true"]

# A worker goes on after a checkpoint only once Ray Train's controller has taken it as the
# run's latest (aesformer.checkpoints.wait_until_taken), so a group restarts from the last
# checkpoint any worker went past: at most checkpoint_every (4) steps are redone.
REDONE_AT_MOST = 4


@pytest.mark.timeout(900)
def test_sft_with_a_worker_node_lost_restores_the_last_checkpoint_and_finishes_every_step(nodes, tmp_path):
    from sft_pairs import pair_rows, write_pairs

    # 12 pairs: 3 steps an epoch on 2 workers (micro-batch 2), 8 epochs = 24 steps, a checkpoint every 4
    data = write_pairs(nodes.shared / "sft-node-lost-pairs", pair_rows(variants=2, size=64))
    out = nodes.shared / "sft-node-lost"
    log = tmp_path / "job.log"
    t0 = time.time()
    proc = start_job(nodes, "jobs/sft.py", SFT + [f"data={data}", f"output={out}", "epochs=8",
                                                  "checkpoint_every=4"], log)
    wait_for(lambda: (out / "ray" / "sft" / "checkpoint-0000008").exists(), proc, log)
    restored, redone = lose_a_training_node(nodes, proc, log, out, t0)
    state = json.loads((out / "ray" / "sft" / "checkpoint-0000024" / "trainer_state.json").read_text())
    assert state["done"] and state["step"] == 24 and state["samples_seen"] == 96
    print(f"restored step {restored}; steps redone: {redone}; world size after: {state['world_size']}")


def lose_a_training_node(nodes, proc, log: Path, out: Path, t0: float) -> tuple[int, int]:
    """Kill the node of a training worker, wait for the job to end, and check
    that it took every step of 1-24, going on from a checkpoint's step (not
    from 0) and redoing at most REDONE_AT_MOST. Returns (restored step, steps redone)."""
    lost = train_worker_nodes(nodes)[-1]
    nodes.kill_node(lost)
    t_kill = time.time()
    before = trained_steps(out)
    assert proc.wait(timeout=600) == 0, log.read_text()[-5000:]
    print(f"node with a training worker lost at {t_kill - t0:.0f}s (step {before[-1]}), "
          f"run done {time.time() - t_kill:.0f}s later")
    taken = trained_steps(out)
    assert sorted(set(taken)) == list(range(1, 25))  # every step, to the end
    lost_at, resumed_at = recovery(taken)
    restored = resumed_at - 1
    assert restored in (4, 8, 12, 16, 20)  # a checkpoint's step: the count went on, not from 0
    assert lost_at >= 8 and lost_at - restored <= REDONE_AT_MOST
    assert taken[taken.index(resumed_at, taken.index(lost_at)):] == list(range(resumed_at, 25))
    return restored, lost_at - restored


def recovery(taken: list[int]) -> tuple[int, int]:
    """(the last step taken before the group restarted, the step it took next)."""
    restart = next(i for i in range(1, len(taken)) if taken[i] <= taken[i - 1])
    return taken[restart - 1], taken[restart]


def editor_checkpoint_steps(out: Path) -> list[int]:
    """The steps of the editor's checkpoints in the shared folder."""
    found = []
    for state in (out / "checkpoints").glob("*/checkpoint_*/trainer_state.json"):
        with contextlib.suppress(ValueError, KeyError):
            found.append(json.loads(state.read_text())["step"])
    return sorted(found)


EDITOR = ["profile=tiny", "tracking.enabled=false", "num_workers=[1,2]", "max_failures=1", "sample_log=true",
          "validation.every=0", "log_every=1"]


@pytest.mark.timeout(900)
def test_editor_lora_with_a_worker_node_lost_restores_the_last_checkpoint_and_finishes_every_step(nodes, tmp_path):
    # 8 sample pairs, batch 1: 4 steps an epoch on 2 workers, 6 epochs = 24 steps, a checkpoint every 4
    out = nodes.shared / "editor-node-lost"
    log = tmp_path / "job.log"
    t0 = time.time()
    proc = start_job(nodes, "jobs/editor_lora.py", EDITOR + [f"output={out}", "epochs=6",
                                                                  "checkpoint_every=4"], log)
    wait_for(lambda: 8 in editor_checkpoint_steps(out), proc, log)
    restored, redone = lose_a_training_node(nodes, proc, log, out, t0)
    assert len(json.loads((out / "losses.json").read_text())) == 24  # the restored history, then the rest
    assert (out / "lora" / "README.md").exists()
    print(f"restored step {restored}; steps redone: {redone}")


# -- VCMP: a streaming Ray Data job; a lost node's pool actors and tasks are redone elsewhere --------

# one video at a time through each stage, each recorded and made durable as it finishes
# four videos: with three, a loaded machine sometimes finished all of them before the loss
VIDEOS = 4
VCMP = ["profile=tiny", "tracking.enabled=false", "shard_rows=4", "checkpoint_s=0", "cpu_stage_tasks=1",
        "pools.screen.batch_size=1", "pools.pairs.batch_size=1"]


def vcmp_pairs(out: Path) -> dict[str, tuple]:
    """pair id -> (video, poor image, good image) of a VCMP output."""
    from aesformer.data import read_pairs

    rows = read_pairs(out / "pairs", columns=["id", "video_id", "poor_image", "good_image"])
    assert len(rows) == len({r["id"] for r in rows}), "a pair written twice"
    return {r["id"]: (r["video_id"], r["poor_image"], r["good_image"]) for r in rows}


def finished_videos(out: Path) -> list[str]:
    path = out / "state" / "videos.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [r["video_id"] for r in lines if r.get("status") != "rejected"]


@pytest.mark.timeout(1200)
def test_vcmp_with_a_worker_node_lost_writes_the_pairs_of_an_uninterrupted_run_once_each(nodes, tmp_path):
    from aesformer.jobs.make_samples import main as make_samples

    videos = nodes.shared / "vcmp-node-lost-videos"
    make_samples([f"output={videos}", f"videos={VIDEOS}", "tracking.enabled=false"])
    t0 = time.time()
    reference = nodes.shared / "vcmp-uninterrupted"
    proc = start_job(nodes, "jobs/vcmp.py", VCMP + [f"input={videos}", f"output={reference}"], tmp_path / "ref.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-5000:]
    t_ref = time.time() - t0

    out = nodes.shared / "vcmp-node-lost"
    log = tmp_path / "job.log"
    proc = start_job(nodes, "jobs/vcmp.py", VCMP + [f"input={videos}", f"output={out}"], log)
    wait_for(lambda: finished_videos(out), proc, log)
    # the node of the pair-mining pool (good frame to alignment) goes, videos still in the stream
    lost = next(name for name in ("node_b", "node_c") if nodes.processes(name, "MinePairs"))
    nodes.kill_node(lost)
    at_kill = finished_videos(out)
    t_kill = time.time()
    assert proc.wait(timeout=600) == 0, log.read_text()[-5000:]
    print(f"uninterrupted run {t_ref:.0f}s; node lost after {len(at_kill)} of {VIDEOS} videos, "
          f"run done {time.time() - t_kill:.0f}s later")

    assert len(at_kill) < VIDEOS  # lost mid-run, videos still in the stream
    assert sorted(finished_videos(out)) == [f"tut{i:04d}" for i in range(VIDEOS)]  # each video recorded once
    want, got = vcmp_pairs(reference), vcmp_pairs(out)
    assert want and sorted(got) == sorted(want)  # none lost, none twice
    assert got == want  # the same frames
    print(f"{len(got)} pairs")

"""Placement that fits: pools added up and placed on the cluster's nodes
before any model loads; a table when they do not fit."""
import pytest

from aesformer.placement import Node, PlacementError, PoolAsk, plan, plan_table, shrink_cpus


def a40_nodes(gpus_per_node=8, nodes=2):
    return [Node("head", {"CPU": 16})] + [Node(f"gpu{i}", {"CPU": 64, "GPU": gpus_per_node}) for i in range(nodes)]


def grpo_a40_asks():
    return [PoolAsk("learner", 8, {"CPU": 4, "GPU": 1}, "auto"), PoolAsk("rollout", 3, {"CPU": 4, "GPU": 1}),
            PoolAsk("reward", 2, {"CPU": 4, "GPU": 2}), PoolAsk("reference", 1, {"CPU": 4, "GPU": 1})]


def test_the_learner_group_goes_whole_onto_one_node_and_the_rest_fills_the_other():
    placed = plan(grpo_a40_asks(), a40_nodes())
    assert placed["learner"] == {"strategy": "STRICT_PACK", "nodes": ["gpu0"] * 8}
    assert placed["rollout"]["nodes"] == ["gpu1"] * 3
    assert placed["reward"]["nodes"] == ["gpu1"] * 2
    assert placed["reference"]["nodes"] == ["gpu1"]
    assert "8 on gpu0" in plan_table(grpo_a40_asks(), placed)


def test_a_group_larger_than_any_node_is_packed_across_nodes():
    placed = plan([PoolAsk("learner", 12, {"GPU": 1}, "auto")], a40_nodes())
    assert placed["learner"]["strategy"] == "PACK"
    assert placed["learner"]["nodes"] == ["gpu0"] * 8 + ["gpu1"] * 4


def test_seventeen_gpus_on_sixteen_fail_with_the_table():
    asks = grpo_a40_asks() + [PoolAsk("extra", 1, {"GPU": 1})]
    with pytest.raises(PlacementError) as e:
        plan(asks, a40_nodes())
    text = str(e.value)
    assert "extra cannot be placed" in text
    assert "pool      | asks" in text
    assert "extra     | 1 x {GPU 1}" in text
    assert "GPU 16 (largest node 8)" in text
    assert "all pools | GPU 17, CPU 56" in text


def test_a_tensor_parallel_bundle_needs_its_gpus_on_one_node():
    # 2 GPUs free in total, but one on each node: a TP-2 judge cannot be placed
    nodes = [Node("a", {"GPU": 1, "CPU": 4}), Node("b", {"GPU": 1, "CPU": 4})]
    with pytest.raises(PlacementError, match="reward cannot be placed"):
        plan([PoolAsk("reward", 1, {"GPU": 2})], nodes)


def test_a_pool_pinned_to_a_missing_node_resource_fails():
    with pytest.raises(PlacementError) as e:
        plan([PoolAsk("learner", 2, {"CPU": 1, "node_x": 1})], [Node("head", {"CPU": 4})])
    assert "node_x 0 (largest node 0)" in str(e.value)


def test_cpu_asks_shrink_to_a_two_core_machine():
    asks = [PoolAsk("learner", 2, {"CPU": 1}), PoolAsk("rollout", 2, {"CPU": 1}), PoolAsk("reward", 1, {"CPU": 1}),
            PoolAsk("reference", 1, {"CPU": 1})]
    factor = shrink_cpus(asks, [Node("head", {"CPU": 2})])
    assert factor == 0.33
    assert [a.bundle["CPU"] for a in asks] == [0.33] * 4
    plan(asks, [Node("head", {"CPU": 2})])  # now fits


def test_cpu_asks_that_fit_are_left_alone():
    asks = [PoolAsk("learner", 2, {"CPU": 1})]
    assert shrink_cpus(asks, [Node("head", {"CPU": 8})]) == 1.0
    assert asks[0].bundle == {"CPU": 1.0}


def grpo_cfg(*args):
    from aesformer.config import load_config
    from aesformer.jobs.grpo_a import GrpoAConfig

    return load_config(GrpoAConfig, "grpo_a", list(args))


def test_the_a40_profile_fits_two_nodes_of_eight_a40_with_the_learner_on_one():
    from aesformer.jobs.grpo_a import fit_pools

    cfg = grpo_cfg("profile=a40")
    asks, placed = fit_pools(cfg, a40_nodes())
    assert sum(a.total().get("GPU", 0) for a in asks) == 16
    assert placed["learner"] == {"strategy": "STRICT_PACK", "nodes": ["gpu0"] * 8}
    assert cfg.learner.placement == "STRICT_PACK"


def test_the_tiny_profile_shrinks_its_cpu_asks_to_a_two_core_head():
    from aesformer.jobs.grpo_a import fit_pools

    cfg = grpo_cfg("profile=tiny")
    asks, placed = fit_pools(cfg, [Node("head", {"CPU": 2})])
    assert sum(a.total()["CPU"] for a in asks) <= 2
    assert cfg.rollout.cpus_per_actor == cfg.learner.cpus_per_worker < 1
    assert placed["learner"]["nodes"] == ["head"] * cfg.learner.workers


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_a40_plan_passes_on_a_head_declaring_16_gpus_and_fails_fast_with_the_table_on_8(tmp_path):
    """``ray start --head --num-gpus N``: nothing loads, only the plan is checked."""
    import subprocess
    import time

    from helpers import PYTHON, REPO, local_cluster_module

    lc = local_cluster_module()
    outcomes = {}
    for gpus in (16, 8):
        with lc.LocalCluster({}, head_cpus=64, head_gpus=gpus) as head:
            t0 = time.time()
            proc = subprocess.run([PYTHON, "jobs/grpo_a.py", "profile=a40", "plan_only=true", f"ray.address={head.address}",
                                   "tracking.enabled=false", f"output={tmp_path / str(gpus)}"], cwd=REPO, env=head.env,
                                  capture_output=True, text=True, timeout=300)
            outcomes[gpus] = (proc, time.time() - t0)
    ok, elapsed_ok = outcomes[16]
    assert ok.returncode == 0, ok.stderr[-3000:]
    learner = next(line for line in ok.stdout.splitlines() if line.startswith("learner "))
    assert "8 x {GPU 1, CPU 4}, all on one node" in learner and "8 on head" in learner
    bad, elapsed = outcomes[8]
    print(f"plan checked in {elapsed_ok:.1f}s (16 GPUs), refused in {elapsed:.1f}s (8 GPUs)")
    assert bad.returncode == 2
    assert "grpo_a: the pools do not fit this cluster (rollout, reward, reference cannot be placed" in bad.stderr
    assert "pool      | asks" in bad.stderr and "GPU 8 (largest node 8)" in bad.stderr
    # the check itself runs right after the driver joins the cluster, before any
    # data or model loads; the wall time is mostly starting Python and joining
    # Ray (38.6 s measured at load average ~45 on 2 cores)
    assert elapsed < 60

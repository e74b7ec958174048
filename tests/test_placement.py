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
        plan(asks, a40_nodes(), job="grpo_a")
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

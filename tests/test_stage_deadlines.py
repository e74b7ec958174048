"""Ray Data model stages: a call that hangs fails within ray.call_timeout
naming the stage, its actor's process is replaced, and a pool that cannot
start fails within ray.placement_timeout naming the stage."""
from __future__ import annotations

import os
import sys
import time

import pyarrow as pa
import pytest

from aesformer.config import RayConfig
from aesformer.stages import StagePlacementError, model_stage, stage_errors

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def ray():
    from aesformer.cluster import init_ray, shutdown_ray

    ray = init_ray(RayConfig(num_cpus=2, num_gpus=0, ship_code=False))
    # the workers cannot import this file: its classes travel by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    shutdown_ray()


class Sleepy:
    """Sleeps ``seconds`` on every row whose value is in ``hang`` (first
    writing its process id and the time to ``stuck_file`` when given); tags
    rows with its process id and the time they ran."""

    def __init__(self, hang: tuple = (), seconds: float = 60.0, stuck_file: str = ""):
        self.hang, self.seconds, self.stuck_file = set(hang), seconds, stuck_file

    def __call__(self, batch: pa.Table) -> pa.Table:
        if set(batch.column("x").to_pylist()) & self.hang:
            if self.stuck_file:
                with open(self.stuck_file, "a") as f:
                    f.write(f"{os.getpid()} {time.time()}\n")
            time.sleep(self.seconds)
        batch = batch.append_column("t", pa.array([time.time()] * batch.num_rows))
        return batch.append_column("pid", pa.array([os.getpid()] * batch.num_rows))


def _rows(ray, values):
    return ray.data.from_arrow([pa.table({"x": [v]}) for v in values])


def test_a_call_that_hangs_fails_naming_the_stage_and_the_timeout(ray):
    from ray.data import ActorPoolStrategy

    ds = model_stage(_rows(ray, [1]), "sleepy", Sleepy, RayConfig(call_timeout=2, placement_timeout=30),
                     fn_constructor_kwargs={"hang": (1,)}, batch_size=1, batch_format="pyarrow",
                     compute=ActorPoolStrategy(size=1), num_cpus=0.5)
    t0 = time.perf_counter()
    with pytest.raises(Exception) as failed, stage_errors():
        ds.take_all()
    waited = time.perf_counter() - t0
    message = str(failed.value)
    assert "stage 'sleepy'" in message and "within 2s" in message and "ray.call_timeout" in message
    assert waited < 20, f"the stage failed after {waited:.1f}s"


def test_the_process_of_a_stuck_call_is_replaced_and_takes_the_next_batch(ray, tmp_path):
    from ray.data import ActorPoolStrategy

    stuck_file = tmp_path / "stuck.txt"
    # keep going past the stuck batch (Ray Data's setting): the batch is dropped, the rest runs
    ds = model_stage(_rows(ray, [1, 2, 3]), "sleepy", Sleepy, RayConfig(call_timeout=2, placement_timeout=30),
                     fn_constructor_kwargs={"hang": (1,), "stuck_file": str(stuck_file)}, batch_size=1,
                     batch_format="pyarrow", compute=ActorPoolStrategy(size=1), num_cpus=0.5)
    ds.context.max_errored_blocks = 1
    with stage_errors():
        rows = ds.take_all()
    assert sorted(r["x"] for r in rows) == [2, 3]
    # none of them ran on the process whose thread is stuck once it was stuck (it ends itself;
    # a fresh one takes over); a batch that ran there before the stuck call is fine
    (pid, since), = [line.split() for line in stuck_file.read_text().splitlines()]
    assert not [r["x"] for r in rows if r["pid"] == int(pid) and r["t"] > float(since)]

def test_a_pool_that_cannot_start_fails_naming_the_stage(ray):
    from ray.data import ActorPoolStrategy

    ds = model_stage(_rows(ray, [1, 2]), "huge", Sleepy, RayConfig(call_timeout=30, placement_timeout=2),
                     batch_size=1, batch_format="pyarrow", compute=ActorPoolStrategy(size=1), num_cpus=0.5,
                     resources={"no_such_node": 1})
    t0 = time.perf_counter()
    with pytest.raises(StagePlacementError, match=r"stage 'huge' .*within 2s \(ray.placement_timeout\)"), \
            stage_errors(RayConfig(placement_timeout=2)):
        ds.take_all()
    assert time.perf_counter() - t0 < 20


def test_an_operator_fused_with_its_neighbours_is_named_by_its_model_stage():
    from aesformer.stages import deadline_class, stage_of

    wrapped = deadline_class(Sleepy, "sleepy", 5)
    assert wrapped.__name__ == "Sleepy" and wrapped.stage == "sleepy"  # Ray Data names the operator after it
    assert stage_of("Map(load_photo)->MapBatches(Sleepy)") == "sleepy"
    assert stage_of("MapBatches(Unknown)") is None
    with pytest.raises(ValueError, match="ray.call_timeout must be positive"):
        deadline_class(Sleepy, "sleepy", 0)

"""GRPO-A as users start it: the job file with the tiny profile through
``ray job submit`` to a cluster whose environment lacks the project (the
job file run locally is what this does, with the code shipped besides)."""
from __future__ import annotations

import json

import pytest
from helpers import ray_head_without_project, submit_job

pytestmark = pytest.mark.slow


def check_tiny_run(out):
    result = json.loads((out / "result.json").read_text())
    assert result["finished"] and result["last_step"] == 3
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3]
    # the judge scored alignment and creativity; validation ran at step 2
    assert all(0.0 < s["reward_creativity_mean"] < 1.0 for s in steps)
    assert "val/reward_mean" in steps[1]
    assert max(s["logprob_mismatch"] for s in steps) < 1e-3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert (out / "model" / "config.json").exists()
    return result


@pytest.mark.timeout(900)
def test_ray_job_submit_to_a_cluster_without_the_project(tmp_path):
    """The README's command against a plain ``ray start --head`` on a 2-core
    machine: the tiny profile's pools (6 CPUs of asks) shrink to the 2 CPUs."""
    out = tmp_path / "grpo"
    with ray_head_without_project(num_cpus=2) as head:
        proc = submit_job(head, ["python", "jobs/grpo_a.py", "profile=tiny", f"output={out}"], timeout=800)
        assert "succeeded" in proc.stdout.lower() + proc.stderr.lower()
    check_tiny_run(out)
    assert (out / "mlflow" / "mlflow.db").exists()  # the embedded tracking store, under output

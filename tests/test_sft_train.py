"""Stage 1(a) SFT end to end on the tiny profile: Ray Train with 2 workers,
DeepSpeed ZeRO-2 over gloo, LoRA. One trained run serves the loss, tracking
and export checks; a second, small run is stopped, fails once, and resumes."""
import collections
import json
from pathlib import Path

import pytest

from aesformer import checkpoints, sft
from aesformer.actions import format_reward
from aesformer.jobs import sft as job

from sft_pairs import greedy_plans, pair_rows, write_pairs

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def ray_session(tiny_models):
    from aesformer.cluster import init_ray, shutdown_ray
    from aesformer.config import RayConfig

    init_ray(RayConfig(num_cpus=8, num_gpus=0))
    yield
    shutdown_ray()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """The six sample photographs, four poor framings each, with short plans."""
    rows = pair_rows(variants=4)
    return write_pairs(tmp_path_factory.mktemp("sft-pairs"), rows), rows


@pytest.fixture(scope="module")
def trained(ray_session, pairs, tmp_path_factory):
    folder, _ = pairs
    out = tmp_path_factory.mktemp("sft-run")
    result = job.main([f"data={folder}", f"output={out}", "epochs=12", "checkpoint_every=25"])  # short plans: 12 passes suffice
    return result, out


def metric_history(result: dict, key: str) -> dict[int, list[float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(result["tracking_uri"])
    by_step = collections.defaultdict(list)
    for m in sorted(client.get_metric_history(result["run_id"], key), key=lambda m: (m.step, m.timestamp)):
        by_step[m.step].append(m.value)
    return by_step


def test_loss_falls_by_at_least_30_percent(trained):
    result, _ = trained
    assert result["done"] and result["step"] == result["total_steps"] == 72  # 24 rows x 12 epochs / 4 per step
    loss = [v[-1] for _, v in sorted(metric_history(result, "train/loss").items())]
    assert len(loss) == 72
    first, last = sum(loss[:10]) / 10, sum(loss[-10:]) / 10
    assert last <= 0.7 * first, (first, last)


def test_training_metrics_are_tracked_per_step(trained):
    result, _ = trained
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/step_time_s", "train/samples_seen"):
        assert len(metric_history(result, key)) == 72, key
    seen = metric_history(result, "train/samples_seen")
    assert seen[72][-1] == 288  # 72 steps x 2 workers x micro-batch 2
    assert result["counts"] == {"used": 288, "cut": 0, "skipped": {"image": 0, "plan": 0, "too_long": 0}}


def test_checkpoints_are_kept_up_to_the_limit(trained):
    _, out = trained
    kept = sorted(p.name for p in (out / "ray" / "sft").glob("checkpoint-*"))
    assert kept == ["checkpoint-0000050", "checkpoint-0000072"]  # every 25 steps and the end, newest 2 kept
    state = checkpoints.read_state(out / "ray" / "sft" / "checkpoint-0000072")
    assert state["done"] and state["step"] == 72 and state["world_size"] == 2


def test_export_is_a_standard_checkpoint_that_writes_well_formed_plans(trained, pairs):
    """The exported tiny thinker's greedy plans for the training photos parse."""
    from transformers import AutoProcessor

    from aesformer.actions import SPECIAL_TOKENS
    from aesformer.data import decode_image

    result, out = trained
    assert result["export"] == result["merged"] == str(out / "export" / "merged")
    assert (Path(result["adapter"]) / "adapter_config.json").is_file()
    processor = AutoProcessor.from_pretrained(result["merged"])
    assert all(processor.tokenizer.convert_tokens_to_ids(t) != processor.tokenizer.unk_token_id for t in SPECIAL_TOKENS)
    assert len(processor.tokenizer.tokenize("".join(SPECIAL_TOKENS))) == 14

    _, rows = pairs
    photos = [sft.cap_pixels(decode_image(r["poor_image"]), 4096) for r in rows[::4]]  # one per sample photo
    plans = greedy_plans(result["merged"], photos, max_new_tokens=160)
    rewards = [format_reward(p) for p in plans]
    assert sum(rewards) >= 0.8 * len(plans), plans


def test_stop_fail_and_resume_continue_without_repeating_samples(ray_session, pairs, tmp_path):
    """16 good pairs, one whose image does not decode and one whose plan does
    not parse; 2 epochs on 2 workers = 9 steps of 4 rows. The first run fails
    once at step 3 (restarts from the step-2 checkpoint) and stops at step 5;
    the rerun continues at step 6 and finishes."""
    import pyarrow.parquet as pq

    from aesformer.data import make_pair

    _, rows = pairs
    good = rows[:16]
    broken_image = dict(rows[16], id="broken-image", poor_image=b"\x89PNG\r\n\x1a\n truncated")
    broken_plan = make_pair("broken-plan", rows[17]["poor_image"], rows[17]["good_image"],
                            plan="<Ratio>(1) Aspect Ratio: crop</Ratio> and then some", validate_plan=False,
                            split="train")
    data = write_pairs(tmp_path / "pairs", good + [broken_image, broken_plan], shard_rows=6)
    assert sum(pq.read_metadata(p).num_rows for p in data.glob("*.parquet")) == 18
    common = [f"data={data}", f"output={tmp_path / 'run'}", "epochs=2", "checkpoint_every=2", "export=false",
              "sample_log=true", "max_failures=1"]

    first = job.main(common + ["max_steps=5", "fail_at_step=3"])
    assert (first["step"], first["done"]) == (5, False)
    second = job.main(common + ["resume=auto"])
    assert (second["step"], second["total_steps"], second["done"]) == (9, 9, True)

    # the failed worker's group restarted from the step-2 checkpoint: step 3 ran twice
    steps_first = metric_history(first, "train/lr")
    assert {s: len(v) for s, v in steps_first.items()} == {1: 1, 2: 1, 3: 2, 4: 1, 5: 1}
    # the rerun continued at the next step, on the same schedule
    steps_second = metric_history(second, "train/lr")
    assert sorted(steps_second) == [6, 7, 8, 9]
    lr = {**{s: v[-1] for s, v in steps_first.items()}, **{s: v[-1] for s, v in steps_second.items()}}
    warmup = sft.warmup_steps(9, 0.1)
    for step in range(1, 10):  # the rate of step s is set after s-1 scheduler steps
        assert lr[step] == pytest.approx(1e-2 * sft.lr_factor(step - 1, 9, warmup), rel=1e-6, abs=1e-12), step

    # every row went through exactly once per epoch: none repeated, none skipped
    trained_at: dict = {}
    for rank in (0, 1):
        for line in (tmp_path / "run" / "sample_log" / f"rank{rank}.jsonl").read_text().splitlines():
            entry = json.loads(line)
            trained_at[(entry["step"], entry["rank"])] = entry["ids"]  # a redone step replaces its first try
    assert sorted({s for s, _ in trained_at}) == list(range(1, 10))
    seen = collections.Counter(i for ids in trained_at.values() for i in ids)
    assert seen == {r["id"]: 2 for r in good}
    # the two bad rows were skipped and counted each epoch, not fatal
    assert second["counts"]["skipped"] == {"image": 2, "plan": 2, "too_long": 0}
    assert second["counts"]["used"] == 32

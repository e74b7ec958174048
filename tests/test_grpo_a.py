"""GRPO-A on the tiny profile, in this process's Ray session: rewards rise,
the weight sync keeps the rollout engines on the learner's weights (and a
broken sync shows), a killed rollout actor does not stop the run, a killed
learner rank restarts the learner group from the newest checkpoint within the
run, and a run resumes from its newest checkpoint with the next prompts and
the saved weights.

The policy is the tiny thinker with the plan tokens, briefly fine-tuned by
plain torch on short plans with random phrases, so that GRPO has a signal to
climb towards the reference plan; rewards are format + rule-based alignment
(no judge), λ = (1, 1, 0).
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

WORDS = dict(ratio=["crop 4:3", "crop 1:1", "keep 3:2", "crop 16:9"],
             composition=["move left", "zoom in", "zoom out", "move right"],
             camera=["lower", "higher", "level", "tilt"], position=["centre", "left third", "right third", "lower third"],
             pose=["turn", "relax", "stand", "sit"], focus=["blur", "sharpen", "keep", "soft"],
             color=["warm", "cool", "bright", "dark"])
INSTRUCTION = "Plan."


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from aesformer.cluster import worker_env

    ray.init(address="local", num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": worker_env()}, log_to_driver=False)
    yield ray
    ray.shutdown()


TARGET = {k: v[0] for k, v in WORDS.items()}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Four train pairs and one test pair, all with the same short reference plan."""
    from aesformer.actions import ActionPlan
    from aesformer.data import ShardWriter, make_pair
    from aesformer.samples import sample_photos

    folder = tmp_path_factory.mktemp("aesrecon")
    photos = [img.resize((64, 64)) for _, img in sample_photos(5)]
    with ShardWriter(folder) as writer:
        for i, photo in enumerate(photos):
            writer.write(make_pair(f"p{i}" if i < 4 else "t0", photo, photo, plan=ActionPlan(**TARGET),
                                   split="train" if i < 4 else "test"))
    return folder


@pytest.fixture(scope="module")
def sft_policy(tiny_models, small_data, tmp_path_factory):
    """The tiny thinker with the plan tokens, fine-tuned by plain torch (120
    steps of 4) on plans whose phrases are drawn at random from four per
    dimension: it writes plan-like text, picking the reference's phrase for a
    dimension about one time in four."""
    import random

    import torch

    from aesformer.actions import ActionPlan
    from aesformer.data import pair_images, read_pairs
    from aesformer.engines import policy_inputs, sequence_logprobs
    from aesformer.models import add_plan_tokens, load_vlm

    torch.manual_seed(0)
    pick = random.Random(0)
    model, processor = load_vlm(tiny_models["thinker"])
    add_plan_tokens(model, processor)
    tokenizer = processor.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    requests = [{"images": [pair_images(r)[0]], "text": INSTRUCTION} for r in read_pairs(small_data, split="train")]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(120):
        plans = [ActionPlan(**{k: pick.choice(v) for k, v in WORDS.items()}).render() for _ in range(4)]
        inputs = policy_inputs(processor, [requests[(step * 4 + i) % len(requests)] for i in range(4)],
                               [tokenizer.encode(p, add_special_tokens=False) + [end] for p in plans])
        logp = sequence_logprobs(model, inputs)
        loss = -(logp * inputs["response_mask"]).sum() / inputs["response_mask"].sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("sft")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


def config(tmp_path, data, init, **overrides):
    from aesformer.config import load_config
    from aesformer.jobs.grpo_a import GrpoAConfig

    base = {"profile": "tiny", "output": str(tmp_path / "run"), "data": str(data), "init": init,
            "instruction": INSTRUCTION, "reward.weights": "[1,1,0]", "reward.alignment": "rule",
            "rollout.actors": 1, "rollout.max_tokens": 16, "val_every": 0, "export_model": "false",
            "prompts_per_step": 2, "prompts_per_update": 2,
            "tracking.enabled": "false", "learner.lr": "1e-4"}
    base.update(overrides)
    cfg = load_config(GrpoAConfig, "grpo_a", [f"{k}={v}" for k, v in base.items()])
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    return cfg


def steps_of(output) -> list[dict]:
    path = Path(output) / "steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def reward_rise(steps: list[dict]) -> float:
    """Mean reward of the last five steps minus that of the first five."""
    return sum(s["reward_mean"] for s in steps[-5:]) / 5 - sum(s["reward_mean"] for s in steps[:5]) / 5


RISE = 0.08  # the bar both modes must clear over 30 steps
# One step off policy may trail the synchronous rise by at most this: the
# tiny runs are deterministic and measured 0.097 (sync) and 0.091 (async)
# with two updates a step and the symmetric clip; 0.02 is the bar's own
# margin under that synchronous rise. (With four updates a step and the
# released clip the synchronous rise is 0.124; the async one is not yet
# measured against this slack.)
ASYNC_SLACK = 0.02


@pytest.fixture(scope="module")
def learning_runs(ray_session, small_data, sft_policy, tmp_path_factory):
    """The 30-step learning run of each mode, run once for the module and
    shared by the tests that read it: ``learning_runs(mode) -> (cfg, result,
    steps)``."""
    from aesformer.jobs.grpo_a import run

    done: dict = {}

    def get(mode: str):
        if mode not in done:
            # 4 prompts x 5 samples a step, an optimizer step per prompt's group
            # (four a step: mini-batches after the first are off policy, so the
            # clip acts); 48 tokens hold the first dimensions of a plan, so the
            # reward is the alignment of those. rollout.async: step k+1 samples
            # from the weights before step k's update. The clipping is the job's
            # default, the released training's ([0.8, 1.3], dual clip 3.0).
            # With two mini-batches of two groups a step the synchronous mean
            # rose only 0.077-0.085 (seeds 42, 1): the windows' means vary by
            # ~0.02 from run to run, so that sat at the bar whatever the clip
            # (the symmetric 0.2 clip, acting on at most 1.2% of the tokens,
            # rose 0.097-0.118); four updates a step on the same samples rose
            # 0.124 and 0.161 (seeds 42, 1) in the same time.
            cfg = config(tmp_path_factory.mktemp(f"learn-{mode}"), small_data, sft_policy, steps=30,
                         checkpoint_every=0, prompts_per_step=4, prompts_per_update=1, **{
                             "rollout.max_tokens": 48, "learner.lr": "6e-4", "tracking.enabled": "true",
                             "rollout.async": str(mode == "async").lower()})
            result = run(cfg)
            done[mode] = (cfg, result, steps_of(cfg.output))
        return done[mode]

    return get


@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_rewards_rise_and_every_sync_keeps_rollout_and_learner_logprobs_equal(learning_runs, mode):
    cfg, result, steps = learning_runs(mode)
    assert [s["step"] for s in steps] == list(range(1, 31))
    # the same bar for both modes
    print(f"{mode}: mean reward rose {reward_rise(steps):.3f}; log-prob mismatch at most "
          f"{max(s['logprob_mismatch'] for s in steps):.2e}")
    assert reward_rise(steps) > RISE, f"mean reward rose {reward_rise(steps):.3f} from steps 1-5 to 26-30"
    if mode == "sync":
        # the rollout engine always samples from the learner's current weights
        assert max(s["logprob_mismatch"] for s in steps) < 1e-3
        assert all(s["weight_versions"] == [s["step"] - 1] * 20 for s in steps)
    else:
        # every sample after the first two steps comes from the weights one update back
        assert all(s["weight_versions"] == [max(0, s["step"] - 2)] * 20 for s in steps)
        assert steps[-1]["weight_staleness_max"] == 1
    # weights travel over the collective, none through the object store; the photos once per step
    assert all(s["weight_sync_object_store_bytes"] == 0 and s["weight_sync_bytes"] > 0 for s in steps)
    assert all(0 < s["transfer_bytes"] <= 1.2 * s["prompt_image_bytes"] for s in steps)
    # every phase and statistic the job promises is logged to MLflow per step
    from mlflow.tracking import MlflowClient

    from aesformer.tracking import default_uri

    client = MlflowClient(default_uri(cfg.output))
    run_id = client.search_runs([client.get_experiment_by_name("aesformer").experiment_id])[0].info.run_id
    logged = set(client.get_run(run_id).data.metrics)
    for key in ("reward_mean", "reward_std", "reward_format_mean", "reward_alignment_mean", "reward_creativity_mean",
                "format_rate", "kl", "entropy", "response_length_mean", "advantage_mean", "advantage_std",
                "clip_frac", "logprob_mismatch", "time/rollout", "time/reward", "time/reference", "time/update",
                "time/sync", "time/sync_transfer", "time/sync_raw_copy", "time/step", "weight_sync_bytes", "transfer_bytes",
                "weight_version_mean"):
        assert key in logged, key
    assert len(client.get_metric_history(run_id, "reward_mean")) == 30
    assert result["finished"] and result["last_step"] == 30


@pytest.mark.timeout(1200)
def test_one_step_off_policy_rollout_learns_no_worse_than_synchronous(learning_runs):
    """The same 30 steps with rollout.async=true: the reward rises at least as
    much as the synchronous run's, less ``ASYNC_SLACK`` (both runs are
    shared with the test above, so this costs no extra run)."""
    sync, off = reward_rise(learning_runs("sync")[2]), reward_rise(learning_runs("async")[2])
    assert off >= sync - ASYNC_SLACK, f"reward rise: async {off:.3f}, sync {sync:.3f} (slack {ASYNC_SLACK})"


@pytest.mark.timeout(300)
def test_a_broken_sync_shows_in_the_logprob_mismatch(ray_session, small_data, sft_policy, tmp_path):
    from aesformer.jobs.grpo_a import run

    cfg = config(tmp_path, small_data, sft_policy, steps=3, checkpoint_every=0, sync_every=0,
                 **{"learner.lr": "1e-3", "learner.kl_coef": 0, "learner.workers": 1})
    run(cfg)
    mismatch = [s["logprob_mismatch"] for s in steps_of(cfg.output)]
    assert mismatch[0] < 1e-3  # before any update both hold the same weights
    assert min(mismatch[1:]) > 1e-2, mismatch  # the rollout engine kept the old ones


@pytest.mark.timeout(300)
def test_a_killed_rollout_actor_is_replaced_and_the_run_completes(ray_session, small_data, sft_policy, tmp_path):
    import ray

    from aesformer.jobs.grpo_a import run

    cfg = config(tmp_path, small_data, sft_policy, steps=4, checkpoint_every=0, **{"learner.kl_coef": 0})
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(result=run(cfg)), daemon=True)
    worker.start()
    deadline = time.time() + 240
    while not steps_of(cfg.output) and time.time() < deadline and worker.is_alive():
        time.sleep(0.2)
    assert steps_of(cfg.output), "the run made no step"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "-rollout-" in a["name"]]
    pid = ray.get(ray.get_actor(names[0]).pid.remote())
    os.kill(pid, signal.SIGKILL)
    worker.join(timeout=240)
    result = box["result"]
    steps = steps_of(cfg.output)
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert result["finished"] and result["restarts"] >= 1
    # the replacement joined a new transfer group (its own at once, or every engine's at
    # the next sync when the death showed there) and received the current weights
    assert steps[-1]["weight_transfer_groups"] >= 2
    assert max(s["logprob_mismatch"] for s in steps) < 1e-3
    assert all(s["weight_sync_object_store_bytes"] == 0 for s in steps)


@pytest.mark.timeout(900)
def test_a_killed_learner_rank_restarts_the_group_from_the_last_checkpoint_within_the_run(ray_session, small_data,
                                                                                         sft_policy, tmp_path):
    import ray

    from aesformer.jobs.grpo_a import Prompts, run

    # steps take about a second once the pools are up: enough of them that the kill lands mid-run
    cfg = config(tmp_path, small_data, sft_policy, steps=8, checkpoint_every=2)
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(result=run(cfg)), daemon=True)
    worker.start()
    state = Path(cfg.output) / "checkpoints" / "step-000002" / "trainer_state.json"
    deadline = time.time() + 600
    while not state.exists() and time.time() < deadline and worker.is_alive():
        time.sleep(0.2)
    assert state.exists(), "the run wrote no checkpoint"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "-learner-1." in a["name"]]
    os.kill(ray.get(ray.get_actor(names[0]).pid.remote()), signal.SIGKILL)  # rank 1, a step or two later
    worker.join(timeout=600)
    result = box["result"]
    steps = steps_of(cfg.output)
    assert result["finished"] and [s["step"] for s in steps] == list(range(1, 9))
    prompts = Prompts(Path(small_data), "train", cfg.seed, INSTRUCTION, Path(cfg.output) / "q.jsonl")
    assert [s["prompt_ids"] for s in steps] == [prompts.take(i * 2, 2) for i in range(8)]
    [recovery] = result["recoveries"]
    assert recovery["kind"] == "learner"
    restored = int(Path(recovery["from_checkpoint"]).name.removeprefix("step-"))
    assert restored in (2, 4, 6) and recovery["steps_redone"] == recovery["lost_at_step"] - restored
    print(f"learner restarted from {recovery['from_checkpoint']} in {recovery['seconds']}s, "
          f"steps redone: {recovery['steps_redone']}")
    assert 1 <= recovery["steps_redone"] <= cfg.checkpoint_every
    assert steps[-1]["learner_restarts"] == 1
    # the engines got the checkpoint's weights back, and the redone steps are on-policy
    assert max(s["logprob_mismatch"] for s in steps) < 1e-3


@pytest.mark.timeout(400)
def test_resume_auto_continues_with_the_next_step_prompts_and_saved_weights(ray_session, small_data, sft_policy,
                                                                            tmp_path):
    from aesformer.checkpoints import STATE_FILE
    from aesformer.jobs.grpo_a import Prompts, run

    first = run(config(tmp_path, small_data, sft_policy, steps=4, checkpoint_every=2, stop_after=2))
    assert first["last_step"] == 2 and not first["finished"]
    saved = json.loads((Path(first["checkpoint"]) / STATE_FILE).read_text())
    assert saved["step"] == 2

    cfg = config(tmp_path, small_data, sft_policy, steps=4, checkpoint_every=2, resume="auto")
    second = run(cfg)
    assert second["resumed_from"] == first["checkpoint"]
    assert second["resumed_weights_sha256"] == saved["weights_sha256"]
    steps = steps_of(cfg.output)
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    prompts = Prompts(Path(small_data), "train", cfg.seed, INSTRUCTION, Path(cfg.output) / "q.jsonl")
    per_step = cfg.prompts_per_step
    assert steps[2]["prompt_ids"] == prompts.take(2 * per_step, per_step)
    assert steps[3]["prompt_ids"] == prompts.take(3 * per_step, per_step)
    # the rollout engines were loaded with the checkpoint's weights too
    assert steps[2]["logprob_mismatch"] < 1e-3
    assert second["finished"] and second["last_step"] == 4


def test_rollout_async_is_off_by_default_and_set_by_its_key(tmp_path):
    assert not config(tmp_path, tmp_path, None).rollout.async_
    assert config(tmp_path, tmp_path, None, **{"rollout.async": "true"}).rollout.async_


def test_config_problems_are_named_before_any_work(tmp_path):
    from aesformer.config import ConfigError
    from aesformer.jobs.grpo_a import check_config

    for overrides, message in [({"prompts_per_step": 3, "prompts_per_update": 2}, "multiple of prompts_per_update"),
                               ({"reward.weights": "[1,1]"}, "three numbers"),
                               ({"reward.alignment": "vibes"}, "reward.alignment"),
                               ({"rollout.n": 1}, "rollout.n"),
                               ({"reward.judge_text": "html"}, "reward.judge_text"),
                               ({"reward.format": "loose"}, "reward.format"),
                               ({"reward.prompts": "no-such-prompts"}, "reward.prompts"),
                               ({"learner.dual_clip": 0.5}, "learner.dual_clip"),
                               ({"learner.clip_ratio_low": 1.5}, "learner.clip_ratio_low"),
                               ({"resume": str(tmp_path / "nope")}, "resume")]:
        with pytest.raises(ConfigError, match=message):
            check_config(config(tmp_path, tmp_path, None, **overrides))


def test_prompt_order_is_a_seeded_permutation_per_epoch(small_data, tmp_path):
    from aesformer.jobs.grpo_a import Prompts

    prompts = Prompts(Path(small_data), "train", 7, INSTRUCTION, tmp_path / "q.jsonl")
    assert prompts.ids == ["p0", "p1", "p2", "p3"]
    first, second = prompts.take(0, 4), prompts.take(4, 4)
    assert sorted(first) == sorted(second) == prompts.ids  # each epoch sees every pair once
    assert prompts.take(2, 4) == first[2:] + second[:2]  # positions run across epochs
    assert Prompts(Path(small_data), "train", 7, INSTRUCTION, tmp_path / "q.jsonl").take(0, 4) == first
    loaded = prompts.load(first[:2])
    assert [p["id"] for p in loaded] == first[:2]
    assert loaded[0]["request"]["text"] == INSTRUCTION and loaded[0]["request"]["images"][0].size == (64, 64)

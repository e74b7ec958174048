"""Benchmark: where the time of a GRPO-A step goes.

Runs a few GRPO-A steps on CPU with a small Qwen3-VL policy (hidden size
256, 4 text layers: big enough that compute dominates, unlike the tiny
model) and prints one JSON line: the median step time, each phase's time
(rollout, reward, reference, update, sync), the weight-sync time and bytes,
and the overhead (step time minus the sum of the phases; negative where
phases overlap) as a fraction of the step. The platform's budget for that
overhead is 15% of the step. Because reward scoring and reference log-probs
overlap the rollout, it also prints the part of the step that no phase
covers (``uncovered``: driver work between the phases).

It then runs the same steps once more with ``rollout.async=true`` and adds
``transfer``: weight sync time over a raw in-process copy of the same tensors
(goal <= 1.2), object-store bytes of the weights per sync (goal 0), bytes the
steps put in the object store over the capped photos' bytes (goal <= 1.2),
and steps per hour with ``rollout.async=true`` over synchronous on the same
pools (goal >= 1.3).

The weight sync time (``weight_sync_s``, the job's ``time/sync_transfer``)
is the time the weights take to arrive: on learner rank 0, from the call
that tells the rollout engines an update starts until every engine has
acknowledged its finish, i.e. every tensor was received and copied into the
engine's parameters (the ZeRO-3 gathers of the learner ranks, packing,
broadcasts and the control calls included). The raw copy (``raw_copy_s``)
copies the same tensors once, in the learner's process, into preallocated
destinations that were touched before (no allocation or page fault timed).
The sync phase as the driver sees it (``sync_phase_s``: also the check that
every rollout actor is alive, the object-store accounting and the Ray call
to the learner) is printed beside it.

With ``peer=trl`` it compares the step with TRL's ``GRPOTrainer`` on the
same policy folder, the same prompts (the job's own prompt records: the
photo capped to ``rollout.max_pixels`` and the thinker's instruction, in the
job's order, 4 per step), group size 5, 64 new tokens, KL coefficient 0.01,
temperature 1.0, the job's learning rate, one update per rollout batch, fp32
on CPU, the vision tower frozen as in our learner, and the same reward on both
sides: Rf alone (``aesformer.rewards.format_score``, strict), so our run uses
``reward.weights=[1.0,0.0,0.0]`` and no judge is loaded. TRL runs once per
thread count (1 and 2, each in its own process), for the same number of
steps; its first step is left out like ours. The JSON then has ``peer``:
TRL's median step per thread count, its phase times (from TRL's own
profiling timers), whether its prompt tokens and pixels equal ours, and
``ours_over_trl_best`` (our median step over TRL's best; goal <= 0.8). Peer
mode skips the ``rollout.async`` run (``transfer`` is absent) to save time.
Our pools are laid out as the tiny profile lays them for the machine: the
local Ray gets the machine's cores, one rollout actor generates the step's 4
prompts in one call on every core (every sample of the step decodes in one
batch), the reference then scores them on every core (the reward pool has no
judge to run here), and each of the two learner ranks trains on its 10
samples in one pass; TRL, one process, takes its 20 samples in one pass too.
TRL is not a dependency of the project: install it to compare
(``pip install -c constraints.txt trl==1.16.0``).

    python tests/benchmarks/grpo_step.py [steps=6] [key=value ...]   # extra keys go to the job config
    python tests/benchmarks/grpo_step.py peer=trl [steps=6]
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PHASES = ("rollout", "reward", "reference", "update", "sync")
BUDGET = 0.15


def small_policy(folder: Path) -> str:
    """The tiny thinker's processor with a wider, deeper Qwen3-VL (random
    weights), plus the plan tokens."""
    import torch
    from transformers import AutoConfig, AutoProcessor, Qwen3VLForConditionalGeneration

    from aesformer.models import add_plan_tokens
    from aesformer.tiny import ensure_tiny_models

    tiny = ensure_tiny_models()["thinker"]
    config = AutoConfig.from_pretrained(tiny)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 256, 768, 4
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = 4, 2, 64
    text.rope_parameters["mrope_section"] = [12, 10, 10]  # sums to head_dim / 2
    config.vision_config.out_hidden_size = 256
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config = Qwen3VLForConditionalGeneration.from_pretrained(tiny).generation_config
    processor = AutoProcessor.from_pretrained(tiny)
    add_plan_tokens(model, processor)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def main(argv: list[str]) -> dict:
    import ray

    from aesformer.cluster import worker_env
    from aesformer.config import load_config
    from aesformer.jobs.grpo_a import GrpoAConfig, run
    from aesformer.synth import sample_aesrecon

    steps = 6
    peer = None
    extra = []
    for arg in argv:
        if arg.startswith("steps="):
            steps = int(arg.split("=", 1)[1])
        elif arg.startswith("peer="):
            peer = arg.split("=", 1)[1]
        else:
            extra.append(arg)
    load_before = os.getloadavg()
    if peer is not None:
        check_peer(peer)  # before anything is built
        extra.append(PEER_REWARD)  # Rf only on both sides: no judge model
    with tempfile.TemporaryDirectory(prefix="grpo-bench-") as tmp:
        tmp = Path(tmp)
        policy = small_policy(tmp / "policy")
        data = sample_aesrecon(tmp / "data", 12, 0, test_fraction=0.25, job="grpo_a")
        args = [f"output={tmp / 'run'}", f"data={data}", f"init={policy}", f"steps={steps}",
                "prompts_per_step=4", "prompts_per_update=4", "val_every=0", "checkpoint_every=0",
                "export_model=false", "rollout.chunk_prompts=4", "rollout.max_tokens=64",
                "learner.micro_batch=10", "reference.threads=0"] + extra
        cfg = load_config(GrpoAConfig, "grpo_a", ["profile=tiny"] + args)
        Path(cfg.output).mkdir(parents=True)
        spec = peer_spec(cfg, policy, steps) if peer is not None else None
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": worker_env()}, log_to_driver=False)
        try:
            run(cfg)
            records = [json.loads(line) for line in (Path(cfg.output) / "steps.jsonl").read_text().splitlines()]
            transfer = transfer_and_async(cfg, records, ["profile=tiny"] + args, tmp) if peer is None else None
        finally:
            ray.shutdown()
        load_after_ours = os.getloadavg()
        # the peer runs after our pools are gone, so both have the machine to themselves
        peer_out = trl_peer(spec, tmp) if peer is not None else None
    measured = records[1:] if len(records) > 1 else records  # the first step warms the caches up
    med = lambda key: statistics.median(r.get(key, 0.0) for r in measured)  # noqa: E731
    step = med("time/step")
    phases = {p: med(f"time/{p}") for p in PHASES}
    overheads = [r["time/step"] - sum(r.get(f"time/{p}", 0.0) for p in PHASES) for r in measured]
    overhead = statistics.median(overheads)
    # the part of the step no phase covers (driver work between phases)
    uncovered = statistics.median(r["time/step"] - r["time/generate_and_score"] - r["time/update"] - r["time/sync"]
                                  for r in measured)
    out = {
        "benchmark": "grpo_step",
        "model": {"hidden_size": 256, "text_layers": 4},
        "steps_measured": len(measured),
        "step_s": round(step, 4),
        "phases_s": {k: round(v, 4) for k, v in phases.items()},
        "sync_s": round(phases["sync"], 4),
        "sync_bytes": int(med("weight_sync_bytes")),
        "overhead_s": round(overhead, 4),
        "overhead_fraction": round(overhead / step, 4) if step else None,
        "overhead_budget": BUDGET,
        "uncovered_s": round(uncovered, 4),
        "uncovered_fraction": round(uncovered / step, 4) if step else None,
        "ok": bool(step and overhead / step <= BUDGET),
    }
    if transfer is not None:
        out["transfer"] = transfer
    out["load_avg_1m"] = {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2),
                          "cores": os.cpu_count()}
    if peer_out is not None:
        out["load_avg_1m"]["after_ours"] = round(load_after_ours[0], 2)
        out["response_length_mean"] = round(med("response_length_mean"), 1)
        out["peer"] = peer_out
        best = min(t["step_s"] for t in peer_out["threads"].values())
        out["ours_over_trl_best"] = round(step / best, 3) if best else None
        out["ours_over_trl_best_goal"] = PEER_GOAL
        out["ours_over_trl"] = {n: round(step / t["step_s"], 3) if t["step_s"] else None
                                for n, t in peer_out["threads"].items()}
    print(json.dumps(out))
    return out


# ---- weight transfer, prompt images and one-step-off-policy rollout --------------------------

def transfer_and_async(cfg, records: list[dict], args: list[str], tmp: Path) -> dict:
    """Ratios from the synchronous run's steps, then the same run with
    rollout.async=true on the same pools for steps per hour."""
    from aesformer.config import load_config
    from aesformer.jobs.grpo_a import GrpoAConfig, run

    measured = records[1:] if len(records) > 1 else records
    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    sync_s, raw_s = med(measured, "time/sync_transfer"), med(measured, "time/sync_raw_copy")
    phase_s = med(measured, "time/sync")
    store = [r["weight_sync_object_store_bytes"] for r in measured]
    moved = [r["transfer_bytes"] / r["prompt_image_bytes"] for r in measured
             if r.get("transfer_bytes") is not None and r["prompt_image_bytes"]]
    acfg = load_config(GrpoAConfig, "grpo_a", args + [f"output={tmp / 'run-async'}", "rollout.async=true"])
    Path(acfg.output).mkdir(parents=True)
    run(acfg)
    arecords = [json.loads(line) for line in (Path(acfg.output) / "steps.jsonl").read_text().splitlines()]
    ameasured = arecords[1:] if len(arecords) > 1 else arecords
    sync_step, async_step = med(measured, "time/step"), med(ameasured, "time/step")
    return {
        "pools": {"rollout": cfg.rollout.actors, "reward": cfg.reward.actors, "reference": cfg.reference.actors,
                  "learner_workers": cfg.learner.workers, "ray_cpus": os.cpu_count(), "machine_cores": os.cpu_count()},
        "weight_sync_s": round(sync_s, 4), "raw_copy_s": round(raw_s, 5),
        "sync_over_raw_copy": round(sync_s / raw_s, 2) if raw_s else None, "sync_over_raw_copy_goal": 1.2,
        "sync_phase_s": round(phase_s, 4), "sync_phase_over_raw_copy": round(phase_s / raw_s, 2) if raw_s else None,
        "weight_sync_buckets_mb": cfg.learner.sync_bucket_mb,
        # where the sync phase goes (learner rank 0's parts, then the driver's)
        "sync_parts_s": {k.removeprefix("time/sync_"): round(med(measured, k), 4) for k in sorted(measured[0])
                         if k.startswith("time/sync_") and k not in ("time/sync_transfer", "time/sync_raw_copy")},
        "weight_sync_bytes": int(med(measured, "weight_sync_bytes")),
        "weight_object_store_bytes_per_sync": max(store) if None not in store else None,
        "transfer_over_capped_images": round(max(moved), 3) if moved else None, "transfer_goal": 1.2,
        "sync_step_s": round(sync_step, 3), "async_step_s": round(async_step, 3),
        "async_over_sync_steps_per_hour": round(sync_step / async_step, 3), "async_goal": 1.3,
        "async_weight_staleness_max": max(r["weight_staleness_max"] for r in arecords),
    }


# ---- end of weight transfer, prompt images and one-step-off-policy rollout -------------------


# ---- peer: TRL's GRPOTrainer on the same model, prompts and reward ---------------------------

PEERS = ("trl",)
PEER_REWARD = "reward.weights=[1.0,0.0,0.0]"
PEER_THREADS = (1, 2)
PEER_GOAL = 0.8
TRL_INSTALL = "pip install -c constraints.txt trl==1.16.0"
PEER_TIMEOUT_S = 1800


def check_peer(peer: str) -> None:
    """Exit with a clear message when the peer is unknown or not installed."""
    import importlib.util

    if peer not in PEERS:
        raise SystemExit(f"peer={peer}: unknown peer; choose one of {', '.join(PEERS)}")
    if importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None:
        raise SystemExit(f"peer=trl needs TRL, which is not a dependency of the project; to compare, install it "
                         f"next to it (into the same environment, pinned with the project's constraints): "
                         f"{TRL_INSTALL}")


def peer_spec(cfg, policy: str, steps: int) -> dict:
    """Our run's settings as the TRL run takes them (checked before either runs)."""
    from aesformer.actions import thinker_instruction

    ro, ln = cfg.rollout, cfg.learner
    group = cfg.prompts_per_step * ro.n
    spec = {
        "policy": policy, "data": cfg.data, "seed": cfg.seed, "instruction": thinker_instruction(cfg.instruction),
        "pixels": [ro.min_pixels, ro.max_pixels], "steps": steps, "prompts_per_step": cfg.prompts_per_step,
        "n": ro.n, "max_tokens": ro.max_tokens, "temperature": ro.temperature, "top_p": ro.top_p,
        "lr": ln.lr, "weight_decay": ln.weight_decay, "grad_clip": ln.grad_clip, "kl_coef": ln.kl_coef,
        "clip_low": ln.clip_ratio_low, "clip_high": ln.clip_ratio_high,
        # one process holds the whole step: TRL's best is one pass over its 20 samples
        "micro_batch": group, "grad_accum": 1, "freeze_vision": ln.freeze_vision,
        "gradient_checkpointing": ln.gradient_checkpointing, "format": cfg.reward.format,
    }
    if cfg.prompts_per_update != cfg.prompts_per_step:
        raise SystemExit("peer=trl compares one update per rollout batch: leave prompts_per_update equal to "
                         f"prompts_per_step ({cfg.prompts_per_step})")
    return spec


def trl_peer(spec: dict, tmp: Path) -> dict:
    """TRL's GRPOTrainer with our run's settings, once per thread count, each
    in its own process (thread settings do not leak between runs)."""
    import subprocess

    out: dict = {"name": "trl", "threads": {}}
    for threads in PEER_THREADS:
        folder = tmp / f"trl-{threads}"
        folder.mkdir()
        spec_path = folder / "spec.json"
        spec_path.write_text(json.dumps({**spec, "threads": threads, "output": str(folder)}))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        load_before = os.getloadavg()
        with open(folder / "log.txt", "w") as log:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"_trl_worker={spec_path}"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, timeout=PEER_TIMEOUT_S)
        result = folder / "result.json"
        if proc.returncode != 0 or not result.exists():
            tail = (folder / "log.txt").read_text()[-3000:]
            raise RuntimeError(f"the TRL run with {threads} thread(s) failed (exit {proc.returncode}):\n{tail}")
        got = json.loads(result.read_text())
        out["version"] = got.pop("version")
        out["prompt_tokens_equal"] = got.pop("prompt_tokens_equal")
        out["pixel_values_equal"] = got.pop("pixel_values_equal")
        out["prompt_tokens"] = got.pop("prompt_tokens")
        got["load_avg_1m"] = {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)}
        out["threads"][str(threads)] = got
    return out


def trl_worker(spec_path: str) -> None:
    """One TRL run (a subprocess of :func:`trl_peer`); writes result.json."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    import time

    import trl
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from trl.data_utils import prepare_multimodal_messages
    from trl.extras import profiling

    from aesformer.actors.learner import is_vision_parameter
    from aesformer.engines import banned_token_ids, prepare_image, prompt_text
    from aesformer.jobs.grpo_a import Prompts
    from aesformer.rewards import format_score

    out_dir = Path(spec["output"])
    # the job's prompt records, in the order our run takes them (data position 0, 4 per step)
    prompts = Prompts(spec["data"], "train", spec["seed"], spec["instruction"], out_dir / "quarantine.jsonl",
                      tuple(spec["pixels"]))
    records = prompts.load(prompts.take(0, spec["steps"] * spec["prompts_per_step"]))
    max_pixels = spec["pixels"][1]
    # what our engines feed the processor: RGB, capped to rollout.max_pixels
    photos = [prepare_image(r["request"]["images"][0], max_pixels) for r in records]
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": r["request"]["text"]}] for r in records],
                                 "image": photos})

    processor = AutoProcessor.from_pretrained(spec["policy"])
    tokenizer = processor.tokenizer
    model = AutoModelForImageTextToText.from_pretrained(spec["policy"], dtype=torch.float32)
    if spec["freeze_vision"]:
        for name, param in model.named_parameters():
            if is_vision_parameter(name):
                param.requires_grad_(False)

    def format_reward(completions, completion_ids, **_):
        # the text as our engine decodes it, scored by our Rf
        return [format_score(tokenizer.decode(ids, skip_special_tokens=True), spec["format"])
                for ids in completion_ids]

    args = GRPOConfig(
        output_dir=str(out_dir / "run"), use_cpu=True, bf16=False, fp16=False, seed=spec["seed"],
        max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=spec["weight_decay"], max_grad_norm=spec["grad_clip"],
        per_device_train_batch_size=spec["micro_batch"], gradient_accumulation_steps=spec["grad_accum"],
        num_generations=spec["n"], max_completion_length=spec["max_tokens"], temperature=spec["temperature"],
        top_p=spec["top_p"], top_k=0, beta=spec["kl_coef"], num_iterations=1, epsilon=spec["clip_low"],
        epsilon_high=spec["clip_high"], loss_type="dapo", scale_rewards="group", shuffle_dataset=False,
        gradient_checkpointing=spec["gradient_checkpointing"],
        generation_kwargs={"suppress_tokens": banned_token_ids(processor)},  # as our engines mask them
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0, dataloader_pin_memory=False)

    # TRL's own phase timers (its profiling contexts), collected per optimizer step with their nesting
    timings: list[tuple[int, str, str, float]] = []
    stack: list[str] = []
    enter, leave = profiling.ProfilingContext.__enter__, profiling.ProfilingContext.__exit__

    def record_enter(self):
        stack.append(self.name)
        return enter(self)

    def record_exit(self, *exc):
        duration = time.perf_counter() - self._start_time
        stack.pop()
        timings.append((self.step or 0, self.name.split(".", 1)[-1], stack[-1].split(".", 1)[-1] if stack else "",
                        duration))
        return leave(self, *exc)

    profiling.ProfilingContext.__enter__, profiling.ProfilingContext.__exit__ = record_enter, record_exit

    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    trainer = GRPOTrainer(model=model, reward_funcs=format_reward, args=args, train_dataset=dataset,
                          processing_class=processor, callbacks=[StepTimes()])

    # the first prompt as TRL tokenizes it, against our engines' encoding of the same record
    row = dataset[0]
    trl_ids, _, trl_fields = trainer._tokenize_prompts([prepare_multimodal_messages(row["prompt"],
                                                                                    images=[row["image"]])])
    request = records[0]["request"]
    ours = processor(text=[prompt_text(processor, request)], images=[prepare_image(request["images"][0], max_pixels)],
                     return_tensors="pt")
    ours_ids = ours["input_ids"][0].tolist()
    tokens_equal = list(trl_ids[0]) == ours_ids
    pixels_equal = bool(torch.equal(trl_fields["pixel_values"], ours["pixel_values"])) if "pixel_values" in trl_fields \
        else False

    timings.clear()
    trainer.train()
    # step k's wall time: from the end of step k-1 (or the start of training) to the end of step k,
    # so data loading and logging between steps count as ours do; step 1 warms up
    step_times = [b - a for a, b in zip(ends, ends[1:])]
    measured = list(range(2, len(step_times) + 1)) if len(step_times) > 1 else [1]
    med = statistics.median
    def per_step(name: str, parent: Optional[str] = None) -> list[float]:
        return [sum(d for s, n, p, d in timings if n == name and (parent is None or p == parent) and s + 1 == k)
                for k in measured]

    timers = {f"{p}/{n}" if p else n: round(med(per_step(n, p)), 4)
              for n, p in sorted({(n, p) for _, n, p, _ in timings})}
    prepare = per_step("_prepare_inputs")
    # TRL's timers mapped onto our phases: rollout = transformers generate, reward = the reward
    # function, reference = the reference model's log-probs (inside _prepare_inputs), update = the
    # rest of the step (the policy's forward passes, backward, optimizer step, logging)
    phases = {"rollout": round(med(per_step("transformers.generate")), 4),
              "reward": round(med(per_step("_calculate_rewards")), 4),
              "reference": round(med(per_step("_get_per_token_logps_and_entropies", "_prepare_inputs")), 4),
              "update": round(med(step_times[k - 1] - t for k, t in zip(measured, prepare)), 4)}
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    result = {
        "version": trl.__version__, "prompt_tokens_equal": tokens_equal, "pixel_values_equal": pixels_equal,
        "prompt_tokens": len(ours_ids),
        "steps": len(step_times), "steps_measured": len(measured),
        "step_s": round(med(step_times[k - 1] for k in measured), 4),
        "step_times_s": [round(t, 3) for t in step_times],
        "phases_s": phases, "timers_s": timers,
        "response_length_mean": round(med(lengths[k - 1] for k in measured), 1) if len(lengths) >= len(step_times)
        else None,
        "torch_threads": torch.get_num_threads(),
    }
    (out_dir / "result.json").write_text(json.dumps(result))


# ---- end of peer ----------------------------------------------------------------------------


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("_trl_worker="):
        trl_worker(sys.argv[1].split("=", 1)[1])
    else:
        main(sys.argv[1:])

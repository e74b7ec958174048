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

    python tests/benchmarks/grpo_step.py [steps=6] [key=value ...]   # extra keys go to the job config
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

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
    extra = []
    for arg in argv:
        if arg.startswith("steps="):
            steps = int(arg.split("=", 1)[1])
        else:
            extra.append(arg)
    with tempfile.TemporaryDirectory(prefix="grpo-bench-") as tmp:
        tmp = Path(tmp)
        policy = small_policy(tmp / "policy")
        data = sample_aesrecon(tmp / "data", 12, 0, test_fraction=0.25, job="grpo_a")
        args = [f"output={tmp / 'run'}", f"data={data}", f"init={policy}", f"steps={steps}",
                "prompts_per_step=4", "prompts_per_update=4", "val_every=0", "checkpoint_every=0",
                "export_model=false", "rollout.actors=2", "rollout.chunk_prompts=1", "rollout.max_tokens=64",
                "learner.micro_batch=5"] + extra
        cfg = load_config(GrpoAConfig, "grpo_a", ["profile=tiny"] + args)
        Path(cfg.output).mkdir(parents=True)
        ray.init(address="local", num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": worker_env()}, log_to_driver=False)
        try:
            run(cfg)
            records = [json.loads(line) for line in (Path(cfg.output) / "steps.jsonl").read_text().splitlines()]
            transfer = transfer_and_async(cfg, records, ["profile=tiny"] + args, tmp)
        finally:
            ray.shutdown()
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
        "transfer": transfer,
    }
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
                  "learner_workers": cfg.learner.workers, "ray_cpus": 8, "machine_cores": os.cpu_count()},
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


if __name__ == "__main__":
    main(sys.argv[1:])

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
        finally:
            ray.shutdown()
        records = [json.loads(line) for line in (Path(cfg.output) / "steps.jsonl").read_text().splitlines()]
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
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])

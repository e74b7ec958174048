"""Benchmark: scoring one GRPO-A step's plans with the judge.

For one step's samples (4 prompts × 5 plans from the sample AesRecon data:
each pair's reference plan and four small variations of it, as a group of
rollouts would differ) it times, on one thread and with the judge already
loaded:

(a) our reward pool's scoring: the real ``RewardWorker.score`` (the actor's
    class called in this process, so the same code path without Ray's call
    overhead) with weights [0.1, 0.5, 0.4]: Rf from the text, Ra and Rc each
    read from one batched forward pass (``score_tokens``);
(b) the release's way on the same judge engine: two short generate calls per
    sample, one for Ra (the alignment request) and one for Rc (the creativity
    request), each call one request, greedy, ``max_tokens`` new tokens.

It prints one JSON line: the median time of each (over ``repeats`` runs,
the two interleaved), per component (Ra, Rc, and Rf for ours),
``release_over_ours`` (goal >= 3), the judge's prompt tokens, and ours again
with the engine's batches cut to one request (``ours_unbatched_s``: what
batching the judge's forward passes gains on this machine). The judge defaults to a random Qwen3-VL of
the size grpo_step.py's policy has (``small_policy``); ``judge=<path>`` (or
``judge=tiny:judge``) uses another. The judge's settings (prompts, the text
it reads, the photo's size) are the job's tiny profile.

    python tests/benchmarks/reward_scoring.py [prompts=4] [n=5] [repeats=3] [max_tokens=4] [judge=<path>]
        [prompt_set=default|plan_last|<file>]

``prompt_set=plan_last`` judges with the same words ordered so that what a
group's plans share (reference, rubric, photo) comes before the plan: the
opening then runs once per group. Both ways of scoring read the same prompts.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_step import small_policy  # noqa: E402  (the benchmarks' shared small Qwen3-VL)

WEIGHTS = (0.1, 0.5, 0.4)
GOAL = 3.0
SHORTER = "Keep it as it is."


def variations(reference: str, others: list[str], n: int) -> list[str]:
    """``n`` plans for one prompt: the reference, then small edits of it (a
    number changed, a dimension shortened, two dimensions shortened, a
    dimension taken from another pair's plan), as a group's samples differ."""
    from aesformer.actions import DIMENSIONS, ActionPlan, extract_dimensions

    base = extract_dimensions(reference)
    other = extract_dimensions(others[0]) if others else base
    edits = [
        lambda d: d,
        lambda d: {**d, "camera": re.sub(r"\d+(\.\d+)?", lambda m: str(round(float(m.group()) * 1.5, 1)), d["camera"])},
        lambda d: {**d, "pose": SHORTER},
        lambda d: {**d, "focus": SHORTER, "color": d["color"].split(";")[0].split(" (")[0] + "."},
        lambda d: {**d, "composition": other["composition"]},
    ]
    plans = []
    for j in range(n):
        values = edits[j % len(edits)]({d.key: base[d.key] or "" for d in DIMENSIONS})
        plans.append(ActionPlan.from_dict(values).render())
    return plans


def step_items(data, prompts: int, n: int, seed: int, instruction: str, pixels: tuple) -> list[dict]:
    """One step's reward items as the job sends them: plan text, the pair's
    reference plan and the poor photo as the rollout saw it."""
    from aesformer.jobs.grpo_a import Prompts

    train = Prompts(data, "train", seed, instruction, Path(tempfile.mkdtemp(prefix="reward-bench-q-")) / "q.jsonl",
                    pixels)
    records = train.load(train.take(0, prompts))
    items = []
    for i, rec in enumerate(records):
        others = [r["reference"] for r in records[i + 1:] + records[:i]]
        for text in variations(rec["reference"], others, n):
            items.append({"text": text, "reference": rec["reference"], "image": rec["request"]["images"][0]})
    return items


def main(argv: list[str]) -> dict:
    import torch

    from aesformer.actors.reward import RewardWorker
    from aesformer.config import load_config
    from aesformer.engines import SamplingSettings, prompt_text, request_images, prepare_image
    from aesformer.jobs.grpo_a import GrpoAConfig
    from aesformer.models import resolve_model, score_token_ids
    from aesformer.actions import thinker_instruction
    from aesformer.rewards import alignment_request, creativity_request
    from aesformer.synth import sample_aesrecon

    opts = {"prompts": 4, "n": 5, "repeats": 3, "max_tokens": 4, "judge": None, "prompt_set": None}
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in opts or not _:
            raise SystemExit(f"unknown argument '{arg}'; known: {', '.join(f'{k}=' for k in opts)}")
        opts[key] = value if key in ("judge", "prompt_set") else int(value)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="reward-bench-") as tmp:
        tmp = Path(tmp)
        judge = resolve_model(opts["judge"], config_key="judge") if opts["judge"] else small_policy(tmp / "judge")
        data = sample_aesrecon(tmp / "data", 3 * opts["prompts"], 0, test_fraction=0.25, job="grpo_a")
        cfg = load_config(GrpoAConfig, "grpo_a", ["profile=tiny", f"data={data}", f"output={tmp / 'run'}"]
                          + ([f"reward.prompts={opts['prompt_set']}"] if opts["prompt_set"] else []))
        rw, ro = cfg.reward, cfg.rollout
        items = step_items(data, opts["prompts"], opts["n"], cfg.seed, thinker_instruction(cfg.instruction),
                           (ro.min_pixels, ro.max_pixels))
        reward_opts = dict(dtype=rw.dtype, max_pixels=rw.max_pixels, seed=cfg.seed)
        judging = dict(prompts=rw.prompts, judge_text=rw.judge_text, image_max_side=rw.image_max_side,
                       format=rw.format)
        # the reward actor's class itself, in this process: the model load is not timed
        worker = RewardWorker.__ray_actor_class__("hf", judge, reward_opts, list(WEIGHTS), "judge", judging)
        torch.set_num_threads(1)
        engine = worker.judge
        score_ids = score_token_ids(engine.tokenizer())  # fails loudly unless "0".."5" are one token each

        # the judge's requests, as the worker builds them
        align = [alignment_request(worker.prompts, it["text"], it["reference"], worker.judge_text) for it in items]
        create = [creativity_request(worker.prompts, it["text"], it["image"], worker.judge_text,
                                     worker.image_max_side) for it in items]
        processor = engine.processor

        def tokens(request):
            images = [prepare_image(im, engine.max_pixels) for im in request_images(request)]
            return int(processor(text=[prompt_text(processor, request)], images=images or None,
                                 return_tensors="pt")["input_ids"].shape[1])

        align_tokens, create_tokens = [tokens(r) for r in align], [tokens(r) for r in create]
        plan_tokens = [len(engine.tokenizer().encode(it["text"], add_special_tokens=False)) for it in items]
        greedy = SamplingSettings(n=1, temperature=0.0, max_tokens=opts["max_tokens"])

        def timed(fn):
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        def ours_parts() -> dict:
            # the components on their own, each as score() runs it
            only = {"rf": (1.0, 0.0, 0.0), "ra": (0.0, 1.0, 0.0), "rc": (0.0, 0.0, 1.0)}
            out = {}
            for name, w in only.items():
                worker.weights = w
                out[name] = timed(lambda: worker.score(items))
            worker.weights = WEIGHTS
            return out

        def release_parts() -> dict:
            return {"ra": timed(lambda: [engine.generate([r], greedy) for r in align]),
                    "rc": timed(lambda: [engine.generate([r], greedy) for r in create])}

        def unbatched() -> float:
            # the same scoring with the engine's batches cut to one request (where batching helps)
            size, engine.batch_size = engine.batch_size, 1
            try:
                return timed(lambda: worker.score(items))
            finally:
                engine.batch_size = size

        load_before = os.getloadavg()
        worker.score(items)  # warm-up (allocator, first-call paths), not timed
        engine.generate([align[0]], greedy)
        engine.generate([create[0]], greedy)
        runs = {"ours": [], "ours_parts": [], "ours_unbatched": [], "release": []}
        scores = None
        for _ in range(opts["repeats"]):  # interleaved, so a change in the machine's load hits both
            t = time.perf_counter()
            scores = worker.score(items)
            runs["ours"].append(time.perf_counter() - t)
            runs["ours_parts"].append(ours_parts())
            runs["ours_unbatched"].append(unbatched())
            runs["release"].append(release_parts())
        med = statistics.median
        ours = med(runs["ours"])
        release_parts_s = {k: med(r[k] for r in runs["release"]) for k in ("ra", "rc")}
        release = med(sum(r.values()) for r in runs["release"])
        out = {
            "benchmark": "reward_scoring",
            "judge": opts["judge"] or "small random Qwen3-VL (hidden 256, 4 text layers)",
            "prompt_set": rw.prompts,
            "samples": len(items), "prompts": opts["prompts"], "n": opts["n"], "repeats": opts["repeats"],
            "weights": list(WEIGHTS), "torch_threads": torch.get_num_threads(),
            "score_token_ids": score_ids,
            "ours_s": round(ours, 4),
            "ours_parts_s": {k: round(med(r[k] for r in runs["ours_parts"]), 4) for k in ("rf", "ra", "rc")},
            "ours_unbatched_s": round(med(runs["ours_unbatched"]), 4), "judge_batch_size": engine.batch_size,
            "release_s": round(release, 4),
            "release_parts_s": {k: round(v, 4) for k, v in release_parts_s.items()},
            "release_calls": 2 * len(items), "release_max_tokens": opts["max_tokens"],
            "release_over_ours": round(release / ours, 2) if ours else None, "goal": GOAL,
            "prompt_tokens": {"alignment_mean": round(statistics.mean(align_tokens), 1),
                              "creativity_mean": round(statistics.mean(create_tokens), 1),
                              "total": sum(align_tokens) + sum(create_tokens)},
            "plan_tokens": {"min": min(plan_tokens), "mean": round(statistics.mean(plan_tokens), 1),
                            "max": max(plan_tokens)},
            "rewards_mean": {k: round(statistics.mean(scores[k]), 4) for k in ("rf", "ra", "rc", "reward")},
        }
        out["load_avg_1m"] = {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2),
                              "cores": os.cpu_count()}
        out["ok"] = bool(out["release_over_ours"] and out["release_over_ours"] >= GOAL)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])

"""Small AesRecon pairs for the SFT tests: the sample photographs, badly
framed by aesformer.synth.poor_framing, each with a short plan rendered from
the known transform (what a teacher would say to undo it); and the greedy
plans an exported thinker writes for photos."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from aesformer.actions import ActionPlan
from aesformer.data import ShardWriter, make_pair
from aesformer.samples import sample_photos
from aesformer.synth import poor_framing

_RATIOS = {1.0: "1:1", 4 / 3: "4:3", 3 / 4: "3:4", 16 / 9: "16:9", 9 / 16: "9:16", 3 / 2: "3:2"}


def _ratio(aspect: float) -> str:
    return min(_RATIOS.items(), key=lambda kv: abs(kv[0] - aspect))[1]


def plan_for(truth: dict) -> ActionPlan:
    """A short plan that undoes the synthetic flaw."""
    zoom, rot, (dx, dy) = truth["zoom"], truth["rotation_deg"], truth["shift"]
    return ActionPlan(
        ratio=f"crop to {_ratio(truth['aspect_good'])}",
        composition="zoom in" if zoom > 1.05 else ("zoom out" if zoom < 0.95 else "keep the framing"),
        camera=f"rotate {'clockwise' if rot > 0 else 'counter-clockwise'}",
        position=f"move the subject {'left' if dx > 0 else 'right'}",
        pose="keep the pose",
        focus="keep the focus",
        color="keep the color",
    )


def pair_rows(variants: int = 4, size: int = 96, seed: int = 0) -> list[dict]:
    """``variants`` poor framings of each sample photograph (poor ≈ size×size pixels)."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, photo in sample_photos():
        photo = photo.copy()
        photo.thumbnail((size * 2, size * 2))
        for k in range(variants):
            poor, truth = poor_framing(photo, rng, size=(size, size))
            good = photo.resize((size, size))
            rows.append(make_pair(f"{name}-{k}", poor, good, plan=plan_for(truth), split="train"))
    return rows


def write_pairs(folder: str | Path, rows: list[dict], shard_rows: int = 8) -> Path:
    with ShardWriter(folder, shard_rows=shard_rows) as writer:
        writer.write_many(rows)
    return Path(folder)


def greedy_plans(model_dir: str | Path, photos: list, max_new_tokens: int, batch: int = 6) -> list[str]:
    """The plans an exported thinker writes for ``photos``, greedily, loaded
    the standard Hugging Face way."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from aesformer.actions import thinker_instruction
    from aesformer.models import generation_prompt_inputs

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    plans = []
    for i in range(0, len(photos), batch):
        inputs = generation_prompt_inputs(processor, photos[i:i + batch], thinker_instruction())
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        plans += processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [p.strip() for p in plans]

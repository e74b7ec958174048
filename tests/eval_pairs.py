"""A handful of AesRecon test pairs from real photographs, for the evaluation tests."""
from __future__ import annotations

from pathlib import Path

from aesformer.data import ShardWriter, make_pair
from aesformer.samples import sample_photos


def write_eval_pairs(folder: Path, n: int = 4, side: int = 96) -> Path:
    """``n`` pairs, split test: good = the photo, poor = an off-centre, darker crop of it."""
    from PIL import ImageEnhance

    rows = []
    for name, photo in list(sample_photos())[:n]:
        good = photo.convert("RGB").resize((side, side))
        w, h = photo.size
        poor = photo.convert("RGB").crop((0, 0, int(w * 0.7), int(h * 0.7))).resize((side, side))
        poor = ImageEnhance.Brightness(poor).enhance(0.6)
        rows.append(make_pair(name, poor, good, split="test"))
    with ShardWriter(folder) as writer:
        writer.write_many(rows)
    return folder


TINY_CLIP = {"embed_dim": 32, "quick_gelu": True,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 128, "width": 32, "heads": 2, "layers": 1}}


def write_tiny_laion(folder: Path, seed: int = 0) -> dict:
    """Offline stand-ins for the LAION aesthetic scorer: a tiny CLIP built
    from an open_clip config with random weights, and a random aesthetic
    head; returns the scorer spec fields (clip, clip_weights, weights)."""
    import json

    import open_clip
    import torch

    from aesformer.scorers import aesthetic_head

    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / "tiny-clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(cfg)
    torch.manual_seed(seed)
    torch.save(open_clip.create_model("tiny-clip", force_quick_gelu=True).state_dict(), folder / "clip.pt")
    torch.save(aesthetic_head(TINY_CLIP["embed_dim"]).state_dict(), folder / "head.pt")
    return {"clip": str(cfg), "clip_weights": str(folder / "clip.pt"), "weights": str(folder / "head.pt")}

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

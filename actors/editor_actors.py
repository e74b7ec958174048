"""Editor actors of the LoRA job: the cache encoder pool and the validation renderer.

:class:`CacheEncoder` is a Ray Data callable (run as an actor pool): for each
(poor, good, plan) pair it computes the cached tensors (the format is in
:mod:`aesformer.editor_cache`) with the pipeline's own methods
(:mod:`aesformer.editor`), so the cached tensors are exactly what inference
feeds the transformer. Each batch is written as its own shard; a second run
over the same data finds every key and starts no encoder.

:class:`ValidationRenderer` holds the full pipeline (the training workers
load only the transformer) and renders fixed validation pairs with the
LoRA weights of a given step: a grid poor | edited | good, logged to MLflow.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterable, Mapping, Optional

import pyarrow as pa

from aesformer import storage
from aesformer.cluster import use_worker_threads
from aesformer.editor_cache import CACHE_SCHEMA, save_tensors

log = logging.getLogger(__name__)


class CacheEncoder:
    """Ray Data callable: (key, id, poor_image, good_image, plan) batches →
    cached tensors written as one shard per batch; returns (key, id, shard, encoded)."""

    def __init__(self, editor_path: str, cache_folder: str, *, control_area: int, condition_area: int,
                 target_area: int, aspects: Iterable[float], dtype: str = "float32", device: str = "auto",
                 editor_name: Optional[str] = None, offload: bool = False):

        from aesformer.data import ShardWriter
        from aesformer.editor import Editor

        use_worker_threads()
        self.editor = Editor.load(editor_path, control_area=control_area, condition_area=condition_area,
                                  dtype=dtype, device=device, name=editor_name, offload=offload)
        self.target_area, self.aspects = int(target_area), tuple(aspects)
        # one writer per actor, its own shard prefix: actors never touch each other's files
        self.writer = ShardWriter(cache_folder, CACHE_SCHEMA, shard_rows=1 << 30, id_field="key",
                                  prefix=f"enc{uuid.uuid4().hex[:8]}", row_group_rows=1)

    def encode(self, poor_bytes: bytes, good_bytes: bytes, plan: str) -> dict:
        from aesformer.data import decode_image
        from aesformer.editor import bucket_size, fit_image
        from aesformer.pipeline import edit_prompt

        poor, good = decode_image(poor_bytes), decode_image(good_bytes)
        tw, th = bucket_size(good.width, good.height, self.target_area, self.aspects)
        target = self.editor.encode_image(fit_image(good, (tw, th)), tw, th)[0]
        cw, ch = self.editor.control_size(poor)
        control = self.editor.encode_image(poor, cw, ch)[0]
        embeds, mask = self.editor.encode_prompt(poor, edit_prompt(plan))
        embeds = embeds[0] if mask is None else embeds[0][mask[0].bool()]
        return {"tensors": save_tensors({"target": target, "control": control, "prompt": embeds}),
                "target_w": tw, "target_h": th, "control_w": cw, "control_h": ch, "prompt_len": embeds.shape[0]}

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist() if isinstance(batch, pa.Table) else batch
        out = []
        for r in rows:
            enc = self.encode(r["poor_image"], r["good_image"], r["plan"])
            self.writer.write({"key": r["key"], "id": r["id"], **enc})
            out.append({"key": r["key"], "id": r["id"]})
        shard = self.writer.flush()
        return pa.Table.from_pylist([{**o, "shard": str(shard), "encoded": 1} for o in out])


class ValidationRenderer:
    """Renders the fixed validation pairs with the LoRA weights of a step.

    ``pairs``: dicts with id, poor_image, good_image (encoded bytes), plan,
    width, height (the target bucket). The LoRA is applied as in training
    (peft adapter + state dict), not through the exported file, so comparing
    its output with a pipeline that loads the export checks the export.
    """

    def __init__(self, editor_path: str, out_dir: str, pairs: list[dict], *, control_area: int,
                 condition_area: int, lora: Mapping, steps: int, true_cfg_scale: float,
                 negative_prompt: Optional[str], seed: int, dtype: str = "float32", device: str = "auto",
                 tracking: Optional[Mapping] = None, editor_name: Optional[str] = None, offload: bool = False):

        from aesformer.data import decode_image
        from aesformer.editor import Editor, lora_config
        from aesformer.tracking import Tracker

        use_worker_threads()
        self.editor = Editor.load(editor_path, control_area=control_area, condition_area=condition_area,
                                  dtype=dtype, device=device, name=editor_name, offload=offload)
        self.editor.pipe.transformer.add_adapter(lora_config(lora["rank"], lora["alpha"], tuple(lora["targets"])))
        self.pairs, self.out_dir = pairs, str(out_dir)  # a local folder or a URI
        # the pairs never change: decode them once, not at every render
        self.images = [(decode_image(p["poor_image"]), decode_image(p["good_image"])) for p in pairs]
        self.steps, self.cfg, self.negative, self.seed = steps, true_cfg_scale, negative_prompt, seed
        self.tracker = Tracker.attach(**tracking) if tracking else None

    def render(self, lora_state: Mapping, step: int, tag: Optional[str] = None) -> dict:
        from peft.utils import set_peft_model_state_dict

        from aesformer.pipeline import edit_prompt

        set_peft_model_state_dict(self.editor.pipe.transformer, dict(lora_state))
        name = tag or f"step_{step:08d}"
        with tempfile.TemporaryDirectory(prefix="validation-") as tmp:
            # rendered here, then put in place (a local folder or a URI)
            folder = Path(tmp) / name
            folder.mkdir()
            rows = []
            for p, (poor, good) in zip(self.pairs, self.images):
                edited = self.editor.edit(poor, edit_prompt(p["plan"]), seed=self.seed, steps=self.steps,
                                          true_cfg_scale=self.cfg, negative_prompt=self.negative,
                                          height=p["height"], width=p["width"])
                edited.save(folder / f"{p['id']}.png")
                rows.append((poor, edited, good))
            grid = Path(tmp) / f"{name}.png"
            image_grid(rows).save(grid)
            if self.tracker is not None:
                self.tracker.log_artifact(grid, "validation")
            images = storage.write_dir(storage.join(self.out_dir, name),
                                       lambda d: shutil.copytree(folder, d, dirs_exist_ok=True))
            grid_path = storage.write_bytes(storage.join(self.out_dir, f"{name}.png"), grid.read_bytes())
        return {"grid": grid_path, "images": images, "step": step}


def image_grid(rows: list[tuple], height: int = 160, pad: int = 4):
    """One row per pair: poor | edited | good, each scaled to ``height``."""
    from PIL import Image

    def scaled(im):
        return im.resize((max(1, round(im.width * height / im.height)), height))

    rows = [[scaled(im) for im in r] for r in rows]
    width = max(sum(im.width for im in r) + pad * (len(r) + 1) for r in rows)
    grid = Image.new("RGB", (width, len(rows) * (height + pad) + pad), "white")
    for i, r in enumerate(rows):
        x = pad
        for im in r:
            grid.paste(im, (x, pad + i * (height + pad)))
            x += im.width + pad
    return grid

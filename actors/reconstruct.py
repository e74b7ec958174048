"""Ray Data callables of the reconstruction job: photo loading, the thinker
pool and the editor pool (the two halves of :class:`aesformer.pipeline.AesFormer`).

Rows flow as dicts: ``name``, ``source`` (a file path) or ``data`` (encoded
bytes), then ``image`` (PNG bytes of the photo as the models see it) or
``skip`` (the reason it is not reconstructed), then ``plan``. The editor pool
writes each result as soon as it has it (image, plan, and last a small JSON
record that marks the photo done), so a killed job loses only the photos in
flight.
"""
from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Optional

import pyarrow as pa

from aesformer.atomic import write_bytes
from aesformer.cluster import use_worker_threads

log = logging.getLogger(__name__)

RESULT_FIELDS = ("name", "status", "reason", "image", "plan", "plan_parsed", "width", "height",
                 "input_width", "input_height", "downscaled", "seconds")


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def load_photo(row: dict, *, min_side: int, max_pixels: int, max_input_pixels: int) -> dict:
    """Ray Data map: decode one photo, or say why it is skipped. A photo
    above ``max_pixels`` is downscaled to it; one that does not decode, has a
    side under ``min_side`` or more than ``max_input_pixels`` pixels is skipped."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    out = {"name": row["name"], "image": None, "skip": None, "input_width": None, "input_height": None,
           "downscaled": False}
    try:
        raw = row["data"] if row.get("data") is not None else Path(row["source"]).read_bytes()
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
            out["input_width"], out["input_height"] = w, h
            if w * h > max_input_pixels:
                out["skip"] = f"huge: {w}x{h} is over the {max_input_pixels}-pixel limit for decoding"
                return out
            if min(w, h) < min_side:
                out["skip"] = f"tiny: {w}x{h}, a side is under {min_side} pixels"
                return out
            im = ImageOps.exif_transpose(im).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        out["skip"] = f"does not decode: {type(e).__name__}: {e}"
        return out
    if im.width * im.height > max_pixels:
        s = (max_pixels / (im.width * im.height)) ** 0.5
        im = im.resize((max(1, int(im.width * s)), max(1, int(im.height * s))), Image.Resampling.LANCZOS)
        out["downscaled"] = True
    out["image"] = _png(im)
    return out


class ThinkerPool:
    """Ray Data callable: a plan for every photo of the batch (skipped rows pass through)."""

    def __init__(self, model_path: str, *, engine: str = "hf", engine_options: Optional[dict] = None,
                 sampling: Optional[dict] = None, instruction: Optional[str] = None, seed: int = 0):

        from aesformer.engines import make_engine, resolve_engine_kind
        from aesformer.pipeline import AesFormer

        use_worker_threads()
        thinker = make_engine(resolve_engine_kind(engine), model_path, **(engine_options or {}))
        self.aesformer = AesFormer(thinker, None, instruction=instruction, sampling=sampling)
        self.seed = seed

    def __call__(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        rows = batch.to_pylist()
        todo = [r for r in rows if r["image"] is not None]
        plans = self.aesformer.think([Image.open(io.BytesIO(r["image"])) for r in todo], seed=self.seed) if todo else []
        for r, p in zip(todo, plans):
            r["plan"] = p
        for r in rows:
            r.setdefault("plan", None)
        return pa.Table.from_pylist(rows)


class EditorPool:
    """Ray Data callable: edits each photo by its plan and writes the result
    (``images/<name>.png``, ``plans/<name>.txt``, ``results/<name>.json``)."""

    def __init__(self, editor_path: str, out_dir: str, *, lora: Optional[str] = None, control_area: int,
                 condition_area: int, output_area: int, steps: int, true_cfg_scale: float,
                 negative_prompt: Optional[str], dtype: str = "float32", device: str = "auto", seed: int = 0,
                 height: Optional[int] = None, width: Optional[int] = None, editor_name: Optional[str] = None,
                 offload: bool = False):

        from aesformer.editor import Editor
        from aesformer.pipeline import AesFormer

        use_worker_threads()
        editor = Editor.load(editor_path, lora=lora, control_area=control_area, condition_area=condition_area,
                             dtype=dtype, device=device, name=editor_name, offload=offload)
        self.aesformer = AesFormer(None, editor, steps=steps, true_cfg_scale=true_cfg_scale,
                                   negative_prompt=negative_prompt, output_area=output_area)
        self.out = Path(out_dir)
        for sub in ("images", "plans", "results"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        self.seed, self.height, self.width = seed, height, width

    def one(self, r: dict) -> dict:
        from PIL import Image

        from aesformer.pipeline import normalise_plan

        res = {k: None for k in RESULT_FIELDS}
        res.update(name=r["name"], input_width=r.get("input_width"), input_height=r.get("input_height"),
                   downscaled=bool(r.get("downscaled")))
        if r.get("skip"):
            res.update(status="skipped", reason=r["skip"])
            log.warning("skipped %s: %s", r["name"], r["skip"])
        else:
            t0 = time.perf_counter()
            photo = Image.open(io.BytesIO(r["image"])).convert("RGB")
            plan, parsed = normalise_plan(r.get("plan") or "")
            out = self.aesformer.edit(photo, plan, seed=self.seed, height=self.height, width=self.width)
            image_path = self.out / "images" / f"{r['name']}.png"
            write_bytes(image_path, _png(out))
            write_bytes(self.out / "plans" / f"{r['name']}.txt", plan.encode())
            res.update(status="ok", image=str(image_path), plan=plan, plan_parsed=parsed, width=out.width,
                       height=out.height, seconds=time.perf_counter() - t0)
            if not parsed:
                res["reason"] = "the plan does not parse; used as free text"
        # the record is written last: its presence marks the photo done
        write_bytes(self.out / "results" / f"{r['name']}.json", json.dumps(res, indent=1).encode())
        return res

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self.one(r) for r in batch.to_pylist()])

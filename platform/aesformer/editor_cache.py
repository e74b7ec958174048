"""The editor cache: what the editor LoRA trains on, encoded once.

For each (poor, good, plan) pair the cache holds what the transformer sees
in training, computed with the pipeline's own encoders (the actors that do
it are in ``aesformer.actors.editor_actors``):

- ``target``: VAE latents of the good image, centre-cropped and resized to
  its aspect bucket;
- ``control``: VAE latents of the poor image at the control area;
- ``prompt``: the text condition of the plan with the poor image in it.

Rows live in Parquet shards (:data:`CACHE_SCHEMA`, one row per row group so
a training worker reads single rows) under ``<cache>/<settings hash>/``,
keyed by the content hash of the pair (:func:`content_key`). This module is
the format: keys, settings, the index, the reader, the collate and the
bucket sampler, shared by the encoder actors and the training job.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import pyarrow as pa

CACHE_VERSION = "editor-cache/1"
CACHE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # content hash of (poor, good, plan)
        pa.field("id", pa.string()),  # the pair's id
        pa.field("tensors", pa.binary(), nullable=False),  # safetensors bytes: target, control, prompt
        pa.field("target_w", pa.int32()), pa.field("target_h", pa.int32()),  # pixels
        pa.field("control_w", pa.int32()), pa.field("control_h", pa.int32()),
        pa.field("prompt_len", pa.int32()),
    ],
    metadata={"aesformer.schema": CACHE_VERSION},
)


def content_key(poor: bytes, good: bytes, plan: str) -> str:
    h = hashlib.sha256()
    for part in (poor, good, (plan or "").encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:32]


def _file_hash(path: Path) -> Optional[str]:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else None


def encoder_settings(editor_path: str, *, dtype: str, control_area: int, condition_area: int,
                     target_area: int, aspects: Iterable[float]) -> dict:
    """Everything the cached tensors depend on besides the pair itself."""
    root = Path(editor_path)
    return {
        "format": CACHE_VERSION,
        "editor": str(editor_path),
        # the encoders' configs (and weights index) of a local model: a rebuilt model gets a new cache
        "vae": _file_hash(root / "vae" / "config.json"),
        "text_encoder": _file_hash(root / "text_encoder" / "config.json"),
        "processor": _file_hash(root / "processor" / "preprocessor_config.json"),
        "vae_weights": _file_hash(root / "vae" / "diffusion_pytorch_model.safetensors"),
        "dtype": dtype, "control_area": int(control_area), "condition_area": int(condition_area),
        "target_area": int(target_area), "aspects": [round(float(a), 6) for a in aspects],
    }


def settings_folder(cache_dir: str, settings: Mapping) -> Any:
    """The cache's folder for these settings (a Path, or a URI for a cache at a URI)."""
    from aesformer import storage

    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    folder = storage.join(cache_dir, digest) if storage.is_uri(cache_dir) else Path(cache_dir).expanduser() / digest
    storage.makedirs(folder)
    meta = storage.join(folder, "settings.json")
    if not storage.exists(meta):
        storage.write_text(meta, json.dumps(settings, indent=2, sort_keys=True))
    return folder


def cache_index(folder: Path) -> dict[str, dict]:
    """key → {shard, row, sizes} over the finished shards of a cache folder."""
    import pyarrow.parquet as pq

    from aesformer.data import finished_shards, parquet_source

    index: dict[str, dict] = {}
    cols = ["key", "id", "target_w", "target_h", "control_w", "control_h", "prompt_len"]
    for shard in finished_shards(folder):
        for i, row in enumerate(pq.read_table(**parquet_source(shard), columns=cols).to_pylist()):
            index[row["key"]] = {**row, "shard": str(shard), "row": i}
    return index


def save_tensors(tensors: Mapping[str, Any]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def load_tensors(blob: bytes) -> dict:
    from safetensors.torch import load

    return load(bytes(blob))


def with_keys(batch):
    """Ray Data map: add the content key (and the normalised plan) to each pair."""
    import pyarrow as pa

    from aesformer.pipeline import normalise_plan

    rows = batch.to_pylist()
    for r in rows:
        r["plan"] = normalise_plan(r["plan"] or "")[0]
        r["key"] = content_key(r["poor_image"], r["good_image"], r["plan"])
    return pa.Table.from_pylist(rows)


def epoch_batches(entries: list[dict], batch_size: int, seed: int, epoch: int, world: int) -> list[list[list[dict]]]:
    """This epoch's batches for every rank: shuffled with (seed, epoch), each
    batch from one bucket (same target and control size), then dealt round
    robin so every rank gets the same number of steps. Same arguments, same
    plan on every rank, which makes resuming at a step exact (after an elastic
    resize the remaining batches of the epoch are dealt anew, so an epoch may
    then see a few pairs twice or miss a few)."""
    order = list(entries)
    random.Random(seed * 1000 + epoch).shuffle(order)
    open_batches: dict[tuple, list] = {}
    batches = []
    for e in order:
        key = (e["target_w"], e["target_h"], e["control_w"], e["control_h"])
        open_batches.setdefault(key, []).append(e)
        if len(open_batches[key]) == batch_size:
            batches.append(open_batches.pop(key))
    batches.extend(b for b in open_batches.values() if b)  # the partial batch of each bucket
    per_rank = len(batches) // world
    return [batches[r:per_rank * world:world] for r in range(world)]


class CacheReader:
    """Reads single cached rows (one row per row group) from the shard files."""

    def __init__(self):
        self._files: dict = {}

    def tensors(self, entry: dict) -> dict:
        import pyarrow.parquet as pq

        from aesformer.data import parquet_source

        f = self._files.get(entry["shard"])
        if f is None:  # a local file or one at a URI
            f = self._files[entry["shard"]] = pq.ParquetFile(**parquet_source(entry["shard"]))
        blob = f.read_row_group(entry["row"], columns=["tensors"]).column("tensors")[0].as_py()
        return load_tensors(blob)


def collate(rows: list[dict]):
    """Stack a bucket's rows: packed target and control tokens, padded prompts with their mask."""
    import torch

    from aesformer.editor import pack_latents

    target = pack_latents(torch.stack([r["target"] for r in rows]))
    control = pack_latents(torch.stack([r["control"] for r in rows]))
    lengths = [r["prompt"].shape[0] for r in rows]
    n, dim = max(lengths), rows[0]["prompt"].shape[1]
    prompt = torch.zeros(len(rows), n, dim, dtype=rows[0]["prompt"].dtype)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        prompt[i, : lengths[i]] = r["prompt"]
        mask[i, : lengths[i]] = 1
    return target, control, prompt, (None if bool(mask.all()) else mask)

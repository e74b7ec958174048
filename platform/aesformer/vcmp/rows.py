"""The row that flows between VCMP stages, and the CPU stages that act on it.

One schema for every stage (:data:`ROW_SCHEMA`): a row is a video (before
segmentation, ``segment_index`` -1) or one of its segments. Per-stage
results accumulate in ``info`` (JSON text: frames with their scores, pairs
with their decisions, edit attempts), and encoded frames in ``images``
(``info`` refers to them by index). Fixed columns keep Arrow happy across
blocks; JSON keeps the nested records readable.

A video that stops before segmentation (screened out) still yields one row
(``kind`` "video"), so the driver learns that it is finished.
"""
from __future__ import annotations

import io
import json
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa

from aesformer.vcmp.pairs import pair_id

ROW_SCHEMA = pa.schema([
    ("video_id", pa.string()),
    ("path", pa.string()),
    ("title", pa.string()),
    ("source", pa.string()),
    ("subtitles", pa.string()),
    ("kind", pa.string()),  # "video" | "segment"
    ("segment_index", pa.int32()),
    ("n_segments", pa.int32()),
    ("start", pa.float64()),
    ("end", pa.float64()),
    ("info", pa.string()),
    ("images", pa.list_(pa.binary())),
])


# Every sampled frame's readings, kept whatever became of the frame (``frames/``).
FRAME_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),  # <video>-s<segment>-t<ms>
    ("video_id", pa.string()),
    ("segment_index", pa.int32()),
    ("time", pa.float64()),
    ("overlay", pa.float64()),
    ("sharpness", pa.float64()),
    ("motion", pa.float64()),
    ("plausible", pa.bool_()),
    ("vlm", pa.float64()),  # P(clean photo-like result); null when the prefilters stopped the frame
    ("good", pa.bool_()),
    ("reason", pa.string()),
], metadata={"aesformer.schema": "vcmp.frame/1"})


def frame_rows(row: dict, data: dict) -> list[dict]:
    """The FRAME_SCHEMA rows of one segment row (a frame's id is the id a pair
    with it as the good frame would get)."""
    out = []
    for f in data.get("frames", []):
        out.append({"id": pair_id(row["video_id"], row["segment_index"], f["t"]),
                    "video_id": row["video_id"], "segment_index": row["segment_index"], "time": f["t"],
                    "overlay": f.get("overlay"), "sharpness": f.get("sharpness"), "motion": f.get("motion"),
                    "plausible": bool(f.get("plausible")), "vlm": f.get("vlm"), "good": bool(f.get("good")),
                    "reason": f.get("reason")})
    return out


def new_row(entry: dict, info: Optional[dict] = None) -> dict:
    """A video row from an ingest entry (video_id, path, title, source, subtitles)."""
    return {"video_id": entry["video_id"], "path": entry["path"], "title": entry.get("title") or "",
            "source": entry.get("source") or "", "subtitles": entry.get("subtitles"), "kind": "video",
            "segment_index": -1, "n_segments": 0, "start": 0.0, "end": float((info or {}).get("probe", {}).get("duration", 0.0)),
            "info": json.dumps(info or {}), "images": []}


def info(row: dict) -> dict:
    return json.loads(row["info"]) if row.get("info") else {}


def with_info(row: dict, data: dict) -> dict:
    out = dict(row)
    out["info"] = json.dumps(data)
    return out


def table(rows: Iterable[dict]) -> pa.Table:
    """Rows → an Arrow table of :data:`ROW_SCHEMA` (what every stage returns)."""
    rows = list(rows)
    fixed = [{**r, "images": [bytes(b) for b in (r.get("images") or [])]} for r in rows]
    return pa.Table.from_pylist(fixed, schema=ROW_SCHEMA)


def rows_of(batch: Any) -> list[dict]:
    """A pyarrow batch (or list of dicts) → row dicts."""
    if isinstance(batch, list):
        return batch
    return batch.to_pylist()


def encode(arr: np.ndarray, fmt: str = "png") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if fmt.lower() in ("jpg", "jpeg"):
        img.save(buf, format="JPEG", quality=95)
    else:
        img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode(data: bytes):
    from PIL import Image

    img = Image.open(io.BytesIO(bytes(data)))
    img.load()
    return img.convert("RGB")

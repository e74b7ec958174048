"""The CPU stages as row functions (Ray Data tasks call them); the model
stages live in ``aesformer.actors.vcmp_actors`` and use the same rows."""
from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from aesformer.vcmp import rows as R
from aesformer.vcmp.align import view_change
from aesformer.vcmp.ingest import ProbeError, content_hash, probe, reject
from aesformer.vcmp.prefilter import frame_checks, plausible, trim_letterbox
from aesformer.vcmp.sample import sample_segment
from aesformer.vcmp.segment import segment_video

log = logging.getLogger(__name__)


def probe_entry(entry: dict, ingest: Any) -> dict:
    """Ingest, per file: content hash and probe. Adds ``content_hash`` and
    ``probe`` (or ``reject``, a rejects-table row) to the entry."""
    out = dict(entry)
    try:
        out["content_hash"] = content_hash(entry["path"])
    except OSError as e:
        out["reject"] = reject(entry["video_id"], entry["path"], "ingest", "unreadable file", str(e))
        return out
    try:
        out["probe"] = probe(entry["path"], check_tail=ingest.check_tail, min_duration_s=ingest.min_duration_s,
                             max_duration_s=ingest.max_duration_s)
    except ProbeError as e:
        out["reject"] = reject(entry["video_id"], entry["path"], "ingest", e.reason, e.detail)
    except Exception as e:  # anything else a broken file can throw: quarantine, never crash
        out["reject"] = reject(entry["video_id"], entry["path"], "ingest", "probe failed", f"{type(e).__name__}: {e}")
    return out


def segment_stage(row: dict, seg: Any) -> list[dict]:
    """Stage 3: a screened-in video row → its segment rows; a screened-out
    one passes through as the video's only row."""
    data = R.info(row)
    if not data.get("screen", {}).get("keep", False):
        return [row]
    duration = data["probe"]["duration"]
    try:
        segments = segment_video(row["path"], duration, analysis_width=seg.analysis_width,
                                 cut_threshold=seg.cut_threshold, cut_ratio=seg.cut_ratio,
                                 merge_similarity=seg.merge_similarity, min_shot_s=seg.min_shot_s,
                                 match_width=seg.match_width)
    except Exception as e:  # a decode failure mid-file: record it, finish the video
        data["error"] = {"stage": "segment", "reason": f"{type(e).__name__}: {e}"}
        return [R.with_info(row, data)]
    if not segments:
        data["error"] = {"stage": "segment", "reason": "no frames decoded"}
        return [R.with_info(row, data)]
    out = []
    for k, s in enumerate(segments):
        seg_info = {"probe": data["probe"], "screen": data["screen"], "content_hash": data.get("content_hash"),
                    "segment": s}
        out.append({**row, "kind": "segment", "segment_index": k, "n_segments": len(segments),
                    "start": s["start"], "end": s["end"], "info": json.dumps(seg_info), "images": []})
    return out


def sample_stage(row: dict, sample: Any, pre: Any, improvement: Any = None) -> dict:
    """Stages 4 and 5a: sample the segment at ``sample.fps``, run the cheap
    checks, keep images only of the first (poor) frame and of plausible
    frames. Every frame's scores are kept in ``info["frames"]``; each
    plausible frame also gets ``same_view`` and ``view`` (see
    :func:`aesformer.vcmp.align.view_change`): whether it shows anything but
    the poor frame's own view."""
    if row["kind"] != "segment":
        return row
    data = R.info(row)
    frames, arrays = [], []
    for t, arr, motion in sample_segment(row["path"], row["start"], row["end"], sample.fps, sample.max_side):
        box = trim_letterbox(arr) if sample.trim_letterbox else (0, 0, arr.shape[1], arr.shape[0])
        crop = np.ascontiguousarray(arr[box[1]:box[3], box[0]:box[2]])
        f = {"t": round(t, 4), "box": list(box), **frame_checks(crop, motion)}
        frames.append(f)
        arrays.append(crop)
    verdicts = plausible(frames, pre.overlay_max, pre.min_sharpness, pre.rel_sharpness, pre.max_motion,
                         pre.min_detail, pre.rel_detail)
    images = []
    for i, (f, (ok, why)) in enumerate(zip(frames, verdicts)):
        f["plausible"], f["reason"] = bool(ok), why
        f["image"] = None
        if i > 0 and ok and improvement is not None:
            v = view_change(arrays[0], arrays[i], min_inliers=improvement.min_inliers,
                            max_scale_change=improvement.max_scale_change,
                            max_rotation_deg=improvement.max_rotation_deg, max_shift=improvement.max_shift,
                            min_change=improvement.min_change, min_detail=pre.min_detail)
            f["same_view"] = v.pop("same")
            f["view"] = v
        if i == 0 or ok:
            f["image"] = len(images)
            images.append(R.encode(arrays[i], sample.image_format))
    data["frames"] = frames
    return {**row, "info": json.dumps(data), "images": images}

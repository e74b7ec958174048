"""Stage 10 pieces: per-segment statistics, the funnel report (JSON and a
readable table) and the evaluation of mined pairs against synthetic truth.

The funnel follows videos, segments, frames and pairs through every stage
with the reasons for what was dropped, like the paper's
5,700 → 2,144 videos → 9,071 pairs.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional, Sequence


def reason_key(reason: Optional[str]) -> str:
    """The reason with its numbers as N ("overlay 0.99 > 0.75" → "overlay N > N")
    and without details in brackets, to count like with like."""
    if not reason:
        return "unknown"
    text = re.sub(r"\(.*?\)|\[.*?\]", "", str(reason))
    return re.sub(r"\s+", " ", re.sub(r"-?\d+(?:\.\d+)?", "N", text)).strip(" ;") or str(reason)


def segment_stats(data: dict) -> dict:
    """Counts of one segment row's info through stages 4–9."""
    frames = data.get("frames", [])
    pairs = data.get("pairs", [])
    st = {
        "segments": 1,
        "frames": len(frames),
        "plausible": sum(1 for f in frames if f.get("plausible")),
        "vlm_frames": sum(1 for f in frames if f.get("vlm") is not None),
        "good_frames": sum(1 for f in frames if f.get("good")),
        "pairs_coarse": len(pairs),
        "segments_with_pairs": int(bool(pairs)),
        # pairs still alive after each stage (a pair dropped at a stage counts up to the one before)
        "pairs_quality": sum(1 for p in pairs if p.get("dropped") in (None, "overlay", "align")),
        "pairs_overlay": sum(1 for p in pairs if p.get("dropped") in (None, "align")),
        "pairs_aligned": sum(1 for p in pairs if p.get("dropped") is None),
        "reasons": {},
        "edits": {},
    }
    r: dict[str, Counter] = {}
    for f in frames:
        if not f.get("plausible"):
            r.setdefault("prefilter", Counter())[reason_key(f.get("reason"))] += 1
        elif not f.get("good"):
            r.setdefault("good_frame", Counter())[reason_key(f.get("reason"))] += 1
    for why in (data.get("good_skipped") or {}).values():
        r.setdefault("pairs", Counter())[reason_key(why)] += 1
    for p in pairs:
        if p.get("dropped"):
            r.setdefault(p["dropped"], Counter())[reason_key(p.get("reason"))] += 1
    err = data.get("error")
    if err and err.get("stage") in ("segment", "sample"):  # model stages already dropped the pairs above
        r.setdefault(err["stage"], Counter())[reason_key(err.get("reason"))] += 1
    st["reasons"] = {k: dict(v) for k, v in r.items()}
    edit = data.get("poor_edit")
    if edit:
        st["edits"] = {edit.get("status", "?"): 1, "attempts": len(edit.get("attempts", []))}
    return st


def merge_stats(a: dict, b: dict) -> dict:
    """Sum two stats dicts (numbers add, nested reason counts add)."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict):
            out[k] = merge_stats(out.get(k, {}), v)
        elif isinstance(v, (int, float)):
            out[k] = out.get(k, 0) + v
        else:
            out[k] = v
    return out


def funnel(records: Sequence[dict], rejects: Sequence[dict], listed: int, written_pairs: int,
           splits: Optional[dict] = None) -> dict:
    """The funnel of a run from the per-video records of the state log."""
    total: dict = {}
    screened_in = 0
    screen_reasons: Counter = Counter()
    failures: Counter = Counter()
    videos_with_pairs = 0
    for r in records:
        if r.get("status") == "screened_out":
            screen_reasons[reason_key(r.get("screen", {}).get("reason"))] += 1
            continue
        if r.get("status") == "failed":
            failures[reason_key(r.get("error"))] += 1
        screened_in += 1
        total = merge_stats(total, r.get("stats", {}))
        videos_with_pairs += int(r.get("stats", {}).get("pairs_aligned", 0) > 0)
    ingest_reasons = Counter(reason_key(x["reason"]) for x in rejects if x.get("stage") == "ingest")
    dedupe_reasons = Counter(reason_key(x["reason"]) for x in rejects if x.get("stage") == "dedupe")
    probed = len(records)
    reasons = total.get("reasons", {})
    g = total.get

    def stage(name, unit_in, n_in, unit_out, n_out, why=None, **extra):
        return {"stage": name, "in": n_in, "out": n_out, "unit_in": unit_in, "unit_out": unit_out,
                "reasons": dict(why or {}), **extra}

    stages = [
        stage("ingest", "files", listed, "videos", listed - sum(ingest_reasons.values()), ingest_reasons),
        stage("dedupe", "videos", listed - sum(ingest_reasons.values()), "videos", probed, dedupe_reasons),
        stage("screen", "videos", probed, "videos", screened_in, screen_reasons),
        stage("segment", "videos", screened_in, "segments", g("segments", 0), failures + Counter(reasons.get("segment", {}))),
        stage("sample", "segments", g("segments", 0), "frames", g("frames", 0), reasons.get("sample")),
        stage("prefilter", "frames", g("frames", 0), "frames", g("plausible", 0), reasons.get("prefilter")),
        stage("good_frame", "frames", g("plausible", 0), "frames", g("good_frames", 0), reasons.get("good_frame"),
              vlm_frames=g("vlm_frames", 0)),
        stage("pairs", "frames", g("good_frames", 0), "pairs", g("pairs_coarse", 0), reasons.get("pairs"),
              segments_with_pairs=g("segments_with_pairs", 0)),
        stage("quality", "pairs", g("pairs_coarse", 0), "pairs", g("pairs_quality", 0), reasons.get("quality")),
        stage("overlay", "pairs", g("pairs_quality", 0), "pairs", g("pairs_overlay", 0), reasons.get("overlay"),
              edits=total.get("edits", {})),
        stage("align", "pairs", g("pairs_overlay", 0), "pairs", g("pairs_aligned", 0), reasons.get("align")),
        stage("write", "pairs", g("pairs_aligned", 0), "pairs", written_pairs, None,
              videos_with_pairs=videos_with_pairs, splits=splits or {}),
    ]
    frames = g("frames", 0)
    return {
        "headline": f"{listed} files → {probed} videos → {screened_in} tutorials → {videos_with_pairs} videos "
                    f"with pairs → {written_pairs} pairs",
        "files": listed, "videos": probed, "tutorials": screened_in, "videos_with_pairs": videos_with_pairs,
        "pairs": written_pairs, "rejects": len(rejects),
        "vlm_fraction": round(g("vlm_frames", 0) / frames, 4) if frames else 0.0,
        "stages": stages,
    }


def funnel_table(f: dict) -> str:
    """The funnel as a fixed-width table with the top reasons per stage."""
    lines = [f["headline"], "", f"{'stage':<11} {'in':>7} {'':<9} {'out':>7} {'':<9} dropped because"]
    lines.append("-" * 78)
    for s in f["stages"]:
        why = ", ".join(f"{k} ({v})" for k, v in sorted(s["reasons"].items(), key=lambda kv: -kv[1])[:3])
        lines.append(f"{s['stage']:<11} {s['in']:>7} {s['unit_in']:<9} {s['out']:>7} {s['unit_out']:<9} {why}")
    lines.append("")
    lines.append(f"frames that reached the VLM judge: {f['vlm_fraction']:.0%}; rejected files: {f['rejects']}")
    return "\n".join(lines)


# -- evaluation against synthetic truth -------------------------------------------------------

def load_truths(folder: str | Path) -> dict[str, dict]:
    """{video_id: truth} from the ``<stem>.json`` files make_samples writes."""
    out = {}
    for p in sorted(Path(folder).glob("*.json")):
        try:
            t = json.loads(p.read_text())
        except ValueError:
            continue
        if isinstance(t, dict) and "events" in t and "video_id" in t:
            out[t["video_id"]] = t
    return out


def evaluate(pairs: Iterable[dict], truths: dict[str, dict], tolerance_s: float = 0.15) -> dict:
    """Event recall and false-pair rate of mined pairs.

    A pair is *correct* when its poor frame lies in an event's poor span and
    its good frame in the same event's good span (± ``tolerance_s``); an
    event is recovered when at least one correct pair hits it."""
    hit: set[tuple[str, int]] = set()
    false_pairs, n = [], 0
    for p in pairs:
        n += 1
        t = truths.get(p["video_id"])
        ok = False
        for e in (t or {}).get("events", []):
            if (e["poor"][0] - tolerance_s <= p["poor_time"] <= e["poor"][1] + tolerance_s
                    and e["good"][0] - tolerance_s <= p["good_time"] <= e["good"][1] + tolerance_s):
                hit.add((p["video_id"], e["index"]))
                ok = True
                break
        if not ok:
            false_pairs.append(p["id"])
    events = sum(len(t["events"]) for t in truths.values())
    missed = [(vid, e["index"]) for vid, t in truths.items() for e in t["events"] if (vid, e["index"]) not in hit]
    return {"events": events, "recovered": len(hit), "recall": len(hit) / events if events else 1.0,
            "pairs": n, "false_pairs": len(false_pairs), "false_rate": len(false_pairs) / n if n else 0.0,
            "false_ids": false_pairs, "missed": missed}

"""What distillation writes, rebuilt from its plan cache so the files always
agree with it: the dataset with plans, the rejects (Parquet and JSON lines),
every attempt, the SFT export, and the run's summary."""
from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from aesformer.atomic import replace_dir, write_jsonl

log = logging.getLogger(__name__)


def write_outputs(cfg: Any, source: Any, out: Any, cache, keys: dict, settings: dict) -> dict:
    """The dataset with plans, the rejects (Parquet and JSONL), every attempt
    and the SFT export, rebuilt from the cache (so they always agree with it).
    For an ``out`` at a URI they are built in a local folder, then each put
    in place there."""
    from aesformer import storage

    if not storage.is_uri(out):
        return _write_outputs(cfg, source, Path(out), cache, keys, settings)
    with tempfile.TemporaryDirectory(prefix="distill-outputs-") as tmp:
        local = Path(tmp)
        written = _write_outputs(cfg, source, local, cache, keys, settings)
        for name in ("pairs", "rejects", "sft"):
            if (local / name).is_dir():
                storage.write_dir(storage.join(out, name),
                                  lambda d, name=name: shutil.copytree(local / name, d, dirs_exist_ok=True))
        for name in ("rejects.jsonl", "attempts.jsonl"):
            storage.write_bytes(storage.join(out, name), (local / name).read_bytes())

    def moved(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(str(local)):
            return storage.join(out, Path(value).relative_to(local).as_posix())
        if isinstance(value, dict):
            return {k: moved(v) for k, v in value.items()}
        return value

    return moved(written)


def _write_outputs(cfg: Any, source: Any, out: Path, cache, keys: dict, settings: dict) -> dict:
    from aesformer.data import ShardWriter, export_sft_json, iter_pairs, make_provenance

    prov_cfg = dataclasses.asdict(cfg)
    pairs_tmp, rejects_tmp = out / ".pairs.tmp", out / ".rejects.tmp"
    for d in (pairs_tmp, rejects_tmp):
        shutil.rmtree(d, ignore_errors=True)
    reject_records = []
    splits = Counter()
    with ShardWriter(pairs_tmp, shard_rows=cfg.shard_rows) as pairs, \
            ShardWriter(rejects_tmp, shard_rows=cfg.shard_rows) as rejects:
        for row in iter_pairs(source):
            info = keys.get(row["id"])
            decided = cache.outcome(info["key"]) if info else None
            if decided is None or decided["status"] not in ("accepted", "rejected", "failed"):
                continue
            rec = decided["record"]
            new = dict(row)
            new["transcript"] = info["transcript"] or row.get("transcript")
            new["provenance"] = make_provenance("distill", {"distill": prov_cfg, "source": row.get("provenance")})
            scores = list(row.get("scores") or [])
            decisions = list(row.get("decisions") or [])
            decisions.append({"stage": "transcript", "decision": info["source"] or "none",
                              "reason": info["reason"]})
            if decided["status"] == "accepted":
                new["plan"] = rec["plan"]
                scores.append({"name": "distill_rounds", "value": float(rec["rounds"])})
                if rec.get("judge_score") is not None:
                    scores.append({"name": "distill_judge", "value": float(rec["judge_score"])})
                decisions.append({"stage": "distill", "decision": "keep",
                                  "reason": f"accepted in round {rec['rounds']} (teacher {rec.get('teacher')})"})
                new["scores"], new["decisions"] = scores, decisions
                pairs.write(new)
                splits[row.get("split")] += 1
            else:
                reason = rec.get("reason") or "unknown"
                decisions.append({"stage": "distill", "decision": "drop" if decided["status"] == "rejected" else "retry",
                                  "reason": f"{reason}: {rec.get('feedback') or ''}".strip(": ")[:2000]})
                new["plan"], new["scores"], new["decisions"] = None, scores or None, decisions
                rejects.write(new)
                reject_records.append({"id": row["id"], "video_id": row.get("video_id"), "status": decided["status"],
                                       "reason": reason, "feedback": rec.get("feedback"), "rounds": rec.get("rounds"),
                                       "last_text": rec.get("last_text")})
    replace_dir(pairs_tmp, out / "pairs")
    replace_dir(rejects_tmp, out / "rejects")
    written = {"dataset": str(out / "pairs"), "rejects": str(out / "rejects"),
               "rejects_jsonl": str(out / "rejects.jsonl"), "attempts": str(out / "attempts.jsonl"),
               "accepted_rows": sum(splits.values())}
    write_jsonl(out / "rejects.jsonl", reject_records)
    write_jsonl(out / "attempts.jsonl", cache.all_attempts())
    if cfg.sft:
        split = cfg.sft_split
        if split is not None and splits and not splits.get(split) and set(splits) == {None}:
            log.warning("no accepted pair has a split; the SFT export takes them all (set sft_split=null to silence)")
            split = None
        shutil.rmtree(out / "sft", ignore_errors=True)
        written["sft"] = export_sft_json(out / "pairs", out / "sft", split=split)
        written["sft"]["split"] = split
    return written


def make_summary(cfg, source, out, cache, keys, total, budget, reused, seen, n_input, written) -> dict:
    accepted, rejected, failed = 0, Counter(), Counter()
    rounds = Counter()
    for info in keys.values():
        decided = cache.outcome(info["key"])
        if decided is None:
            continue
        rec = decided["record"]
        if decided["status"] == "accepted":
            accepted += 1
        elif decided["status"] == "rejected":
            rejected[rec.get("reason") or "unknown"] += 1
        else:
            failed[rec.get("reason") or "unknown"] += 1
        if rec.get("rounds"):
            rounds[str(rec["rounds"])] += 1
    decided_n = accepted + sum(rejected.values()) + sum(failed.values())
    sources = Counter(info["source"] or "none" for info in keys.values())
    no_transcript = Counter(info["code"] or "unknown" for info in keys.values() if not info["transcript"])
    all_requests = 0
    for a in cache.all_attempts():
        all_requests += int((a.get("usage") or {}).get("requests") or 0) + int((a.get("judge") or {}).get("requests") or 0)
    return {
        "input": str(source), "output": str(out), "pairs_in_input": n_input, "pairs_seen": seen,
        "accepted": accepted, "rejected": dict(rejected), "failed": dict(failed),
        "pending": (n_input if cfg.limit is None else min(n_input, cfg.limit)) - decided_n,
        "rounds_used": dict(sorted(rounds.items(), key=lambda kv: int(kv[0]))),
        "mean_rounds": round(sum(int(k) * v for k, v in rounds.items()) / max(1, sum(rounds.values())), 3),
        "requests": {"this_run": budget.snapshot(), "all_runs": all_requests},
        "attempts_this_run": total.attempts, "reused_from_cache": reused,
        "stopped": total.stopped, "transcripts": dict(sources), "transcript_missing": dict(no_transcript),
        "teacher": cfg.teacher.kind, "judge": cfg.validator.judge, "max_rounds": cfg.validator.max_rounds,
        "dataset": written["dataset"], "rejects": written["rejects_jsonl"], "attempts": written["attempts"],
        "sft": written.get("sft"),
    }

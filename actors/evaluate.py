"""Ray Data callables of the evaluation job.

Generation reuses the reconstruction job's pools
(:class:`~aesformer.actors.reconstruct.ThinkerPool`,
:class:`~aesformer.actors.reconstruct.EditorPool`: the editor writes each
output, plan and result record as soon as it has them); this module adds the
steps a system may put between them (no thinker, a thinker behind an
OpenAI-compatible endpoint, plans in a shuffled dimension order) and the
local judge pool.

Rows of the judge carry paths: ``output`` (the system's image) and
``reference_path`` (the poor or good photo), both under the job's output
folder, which must be storage every node sees.
"""
from __future__ import annotations

import io
import json
import logging
from typing import Optional

import pyarrow as pa

from aesformer.cluster import use_worker_threads

log = logging.getLogger(__name__)


def with_instruction(row: dict, *, instruction: str) -> dict:
    """Ray Data map for a system without a thinker: the editor gets a fixed instruction."""
    row["plan"] = None if row.get("image") is None else instruction
    return row


def shuffled(row: dict, *, seed: int) -> dict:
    """Ray Data map: the plan's seven lines in a shuffled order (the ablation)."""
    from aesformer.evaluation.systems import shuffle_plan

    if row.get("plan"):
        row["plan"] = shuffle_plan(row["plan"], seed)
    return row


class EndpointThinker:
    """Ray Data callable: plans from an OpenAI-compatible endpoint (the
    distillation teacher's client: retries, backoff, rate limit)."""

    def __init__(self, endpoint: dict, *, instruction: Optional[str] = None, sampling: Optional[dict] = None):
        from aesformer.actions import thinker_instruction
        from aesformer.distill.chat import OpenAIChat

        self.chat = OpenAIChat(**endpoint)
        self.instruction = thinker_instruction(instruction)
        self.sampling = sampling or {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        rows = batch.to_pylist()
        todo = [r for r in rows if r["image"] is not None]
        convs = [[{"role": "user", "content": [{"type": "image", "image": Image.open(io.BytesIO(r["image"]))},
                                               {"type": "text", "text": self.instruction}]}] for r in todo]
        for r, reply in zip(todo, self.chat.complete(convs, self.sampling) if convs else []):
            r["plan"] = reply.text or ""
            if reply.error:
                log.warning("thinker endpoint failed on %s: %s", r["name"], reply.error)
        for r in rows:
            r.setdefault("plan", None)
        return pa.Table.from_pylist(rows)


def _verdict_record(row: dict, reply: dict, verdict: Optional[str], judge: str) -> dict:
    from aesformer.evaluation.judge import outcome

    error = reply.get("error")
    if error is None and verdict is None:
        error = "no verdict in the reply"
    return {k: row[k] for k in ("key", "ord", "system", "photo", "seed", "reference")} | {
        "verdict": verdict, "outcome": outcome(verdict, row["ord"]), "raw": reply.get("raw"), "error": error,
        "failures": json.dumps(list(reply.get("failures") or [])
                               + ([error] if error and error not in (reply.get("failures") or []) else [])),
        "requests": int(reply.get("requests") or 0), "judge": judge}


def judge_images(row: dict):
    """(image A, image B) of one judgement, in the order it asks."""
    from PIL import Image

    from aesformer.evaluation.judge import OUTPUT_FIRST

    out = Image.open(row["output"]).convert("RGB")
    ref = Image.open(row["reference_path"]).convert("RGB")
    return (out, ref) if row["ord"] == OUTPUT_FIRST else (ref, out)


class LocalJudge:
    """Ray Data callable: verdicts from a local VLM, read from its
    first-token log-probs over ``A``, ``B`` and ``T`` (tie)."""

    def __init__(self, model_path: str, *, engine: str = "hf", engine_options: Optional[dict] = None):
        from aesformer.distill.chat import EngineChat
        from aesformer.engines import make_engine, resolve_engine_kind

        use_worker_threads()
        kind = resolve_engine_kind(engine)
        self.chat = EngineChat(make_engine(kind, model_path, **(engine_options or {})), model=model_path, kind=kind)
        self.name = f"local:{model_path}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        from aesformer.evaluation.judge import LOCAL_CANDIDATES, conversation, verdict_from_logprobs

        rows = batch.to_pylist()
        replies = self.chat.score([conversation(*judge_images(r)) for r in rows], list(LOCAL_CANDIDATES))
        out = []
        for r, rep in zip(rows, replies):
            d = rep.to_dict()
            d["raw"] = json.dumps(rep.first_logprobs) if rep.first_logprobs else None
            verdict = verdict_from_logprobs(rep.first_logprobs) if rep.first_logprobs else None
            out.append(_verdict_record(r, d, verdict, self.name))
        return pa.Table.from_pylist(out)


def endpoint_verdicts(chat, rows: list[dict], sampling: dict) -> list[dict]:
    """Verdicts of an OpenAI-compatible judge for ``rows`` (asked concurrently
    by the client; each reply parsed, a reply with no verdict recorded as such)."""
    from aesformer.evaluation.judge import conversation, parse_verdict

    replies = chat.complete([conversation(*judge_images(r)) for r in rows], sampling)
    out = []
    for r, rep in zip(rows, replies):
        d = rep.to_dict()
        d["raw"] = rep.text
        verdict = parse_verdict(rep.text) if rep.error is None else None
        out.append(_verdict_record(r, d, verdict, f"openai:{chat.model}"))
    return out

"""Rollout pool: actors that each hold one inference engine (vLLM on GPU,
transformers on CPU) and sample completions with their log-probs.

The learner pushes new weights after every update (:meth:`update_weights`,
raw bytes + a JSON-able description, see ``aesformer.engines.pack_weights``);
``version`` counts the updates an actor has loaded, so the driver can tell a
fresh replacement from an up-to-date actor.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import ray

from aesformer.cluster import use_worker_threads


def engine_options(kind: str, options: Optional[dict]) -> dict:
    """The options that apply to ``kind``; an hf engine on a GPU actor uses it."""
    import torch

    # make_engine keeps only the options that apply to its kind
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    if kind == "hf":
        opts.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    return opts


@ray.remote
class RolloutWorker:
    def __init__(self, engine_kind: str, model_path: str, options: Optional[dict] = None):
        use_worker_threads()
        from aesformer.engines import make_engine, resolve_engine_kind

        self.kind = resolve_engine_kind(engine_kind)
        self.engine = make_engine(self.kind, model_path, **engine_options(self.kind, options))
        self.version = 0

    def pid(self) -> int:
        return os.getpid()

    def generate(self, requests: Sequence[dict], sampling: dict) -> list[list[dict]]:
        """For each request, ``sampling["n"]`` completions as dicts
        (token_ids, logprobs, text, finish_reason)."""
        groups = self.engine.generate(list(requests), sampling)
        return [[c.to_dict() for c in group] for group in groups]

    def update_weights(self, version: int, *chunks: tuple) -> int:
        """Load weight chunks ``(meta, buffer)`` in place; returns the tensors loaded."""
        loaded = 0
        for meta, buffer in chunks:
            loaded += self.engine.update_weights(meta, buffer)
        self.version = version
        return loaded

    def get_version(self) -> int:
        return self.version

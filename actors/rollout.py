"""Rollout pool: actors that each hold one inference engine (vLLM on GPU,
transformers on CPU) and sample completions with their log-probs.

New weights arrive over a collective from learner rank 0
(``aesformer.weight_sync``): the learner drives each actor through
:class:`RolloutClient` with vLLM's four calls (init, start, update, finish);
the tensors themselves travel over the transfer group (NCCL on GPU, gloo on
CPU), never through the object store. ``version`` is the learner step whose
weights the engine holds; every completion carries it as ``weight_version``.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import ray

from aesformer.cluster import use_worker_threads

CALL_TIMEOUT_S = 900.0


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
        options = dict(options or {})
        use_worker_threads(options.pop("threads", None))
        from aesformer.engines import make_engine, resolve_engine_kind

        self.kind = resolve_engine_kind(engine_kind)
        opts = engine_options(self.kind, options)
        self.engine = make_engine(self.kind, model_path, **opts)
        self.workers = int(opts.get("tensor_parallel_size") or 1) if self.kind == "vllm" else 1
        self.version = 0

    def pid(self) -> int:
        return os.getpid()

    def generate(self, requests: Sequence[dict], sampling: dict) -> list[list[dict]]:
        """For each request, ``sampling["n"]`` completions as dicts
        (token_ids, logprobs, text, finish_reason, weight_version)."""
        from aesformer.actors.images import resolve_requests

        groups = self.engine.generate(resolve_requests(requests), sampling)
        return [[{**c.to_dict(), "weight_version": self.version} for c in group] for group in groups]

    # -- the weight transfer's engine side (called by RolloutClient) -----------------------
    def transfer_world_size(self) -> int:
        """Ranks this engine takes in the transfer group (its tensor-parallel workers)."""
        return self.workers

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.engine.init_weight_transfer(init_info)

    def start_weight_update(self) -> None:
        self.engine.start_weight_update()

    def update_weights(self, update_info: dict) -> int:
        return self.engine.receive_weights(update_info)

    def finish_weight_update(self, version: Optional[int] = None) -> int:
        self.engine.finish_weight_update()
        if version is not None:
            self.version = int(version)
        return self.version

    def get_version(self) -> int:
        return self.version


class RolloutClient:
    """The learner's handle on the rollout engines for one transfer group: the
    four calls of vLLM's ``VLLMWeightSyncClient``, each fanned out to every
    actor. Engines sit in the group one after another after the trainer's rank
    0, ``world_sizes[i]`` ranks each (vLLM's own init payload gives every
    engine rank offset 1; this client moves each to its place)."""

    def __init__(self, handles: Sequence, world_sizes: Sequence[int], timeout_s: float = CALL_TIMEOUT_S):
        self.handles, self.world_sizes, self.timeout_s = list(handles), [int(w) for w in world_sizes], timeout_s
        self.version: Optional[int] = None  # tagged on the engines at finish

    @property
    def world_size(self) -> int:
        return sum(self.world_sizes)

    def _all(self, refs: list) -> list:
        return ray.get(refs, timeout=self.timeout_s)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        from aesformer.weight_sync import rank_offsets

        offsets = rank_offsets(self.world_sizes, first=int(init_info.get("rank_offset", 1)))
        self._all([h.init_weight_transfer_engine.remote({**init_info, "rank_offset": o})
                   for h, o in zip(self.handles, offsets)])

    def start_weight_update(self) -> None:
        self._all([h.start_weight_update.remote() for h in self.handles])

    def update_weights(self, update_info: dict) -> None:
        self._all([h.update_weights.remote(update_info) for h in self.handles])

    def finish_weight_update(self, weight_version: Optional[str] = None) -> None:
        version = self.version if weight_version is None else int(weight_version)
        self._all([h.finish_weight_update.remote(version) for h in self.handles])

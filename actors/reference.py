"""Reference pool: the frozen starting policy, giving the log-probs of
sampled responses for the KL term of the GRPO-A loss."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import ray

from aesformer.cluster import use_worker_threads


@ray.remote
class ReferenceWorker:
    def __init__(self, model_path: str, dtype: str = "float32", device: Optional[str] = None,
                 micro_batch: int = 8, max_pixels: Optional[int] = None, threads: Optional[int] = None):
        import torch

        use_worker_threads(threads)
        from aesformer.models import load_vlm

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.processor = load_vlm(model_path, dtype=getattr(torch, dtype), device=device)
        self.model.requires_grad_(False)
        from aesformer.engines import banned_token_ids

        self.banned_ids = banned_token_ids(self.processor)
        self.micro_batch = max(1, int(micro_batch))
        self.max_pixels = max_pixels

    def pid(self) -> int:
        return os.getpid()

    def logprobs(self, requests: Sequence[dict], responses: Sequence[Sequence[int]],
                 temperature: float = 1.0) -> list[list[float]]:
        """Per response, the reference log-prob of each of its tokens, at the
        sampling temperature (as the learner computes its own)."""
        import torch

        from aesformer.actors.images import resolve_requests
        from aesformer.engines import response_logprobs

        requests = resolve_requests(requests)  # photos arrive as object-store references, each fetched once
        with torch.no_grad():
            # each prompt runs once; its responses continue it, micro_batch at a time
            logp, _, _ = response_logprobs(self.model, self.processor, requests, list(responses), temperature,
                                           banned_ids=self.banned_ids, max_pixels=self.max_pixels,
                                           max_batch=self.micro_batch)
        return [logp[i, :len(r)].float().cpu().tolist() for i, r in enumerate(responses)]

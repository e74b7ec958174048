"""Learner: a DeepSpeed worker group of Ray actors training the policy with
the GRPO-A loss of ``aesformer.grpo``.

Each worker is one data-parallel rank: it sets MASTER_ADDR / MASTER_PORT /
RANK / WORLD_SIZE / LOCAL_RANK, joins ``deepspeed.init_distributed`` (NCCL on
GPU, gloo on CPU), loads the policy (partitioned at load time under ZeRO-3),
freezes the vision tower and wraps the rest in a DeepSpeed engine built from
``aesformer.deepspeed_engine.deepspeed_config``.

One :meth:`LearnerWorker.update` call per rollout step trains on this rank's
share of every mini-batch. The loss is the token-mean over all response
tokens of the mini-batch (across micro-batches and ranks) of the clipped
policy loss plus ``kl_coef`` times the k3 KL to the reference policy. Every
rank runs the same number of forward passes (short shards are padded with a
zero-weight copy of a real sample), as ZeRO-3's collectives require.

Weights leave the group over a collective to the rollout engines
(``aesformer.weight_sync``): every rank gathers the ZeRO-3 partitions a few
whole layers at a time (``aesformer.deepspeed_engine.GatheredSource``, about a
bucket per gather) while rank 0 broadcasts them to the engines — vLLM's NCCL weight-transfer engine on GPU, a gloo
group on CPU — and drives the engines' init / start / update / finish calls.
No weight byte goes through the object store.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import ray

from aesformer.cluster import use_worker_threads

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def is_vision_parameter(name: str) -> bool:
    """Parameters of the vision tower (frozen in GRPO-A)."""
    return ".visual." in name or name.startswith("visual.")


@ray.remote
class LearnerWorker:
    def __init__(self, rank: int, world: int, model_path: str, settings: dict):
        use_worker_threads()
        self.rank, self.world, self.model_path, self.s = rank, world, model_path, dict(settings)
        self.engine = None
        self.transfer = None
        self.version = 0  # the step whose update these weights are

    def pid(self) -> int:
        return os.getpid()

    def address(self) -> tuple[str, int]:
        """Where rank 0 listens for the process group (this node's IP, a free port)."""
        return ray.util.get_node_ip_address(), _free_port()

    # -- set-up ---------------------------------------------------------------------------
    def setup(self, master_addr: str, master_port: int) -> dict:
        import deepspeed
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from aesformer import deepspeed_engine

        cuda = torch.cuda.is_available()
        os.environ.update(MASTER_ADDR=str(master_addr), MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world), LOCAL_RANK="0" if cuda else str(self.rank))
        if cuda:  # Ray gives each worker its own GPU(s): device 0 is ours
            torch.cuda.set_device(0)
        deepspeed_engine.skip_unused_ops()
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
        s = self.s
        conf = deepspeed_engine.deepspeed_config(zero_stage=s["zero_stage"], bf16=s["bf16"], lr=s["lr"],
                                   weight_decay=s["weight_decay"], grad_clip=s["grad_clip"],
                                   micro_batch=s["micro_batch"], grad_accum=s["grad_accum"])
        self._hf_ds = None
        if s["zero_stage"] == 3:
            # partition the weights while loading instead of holding a full copy per rank
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds = HfDeepSpeedConfig(conf)
        from aesformer.storage import local_copy

        local = local_copy(self.model_path)  # a folder at a URI: this node's copy
        model = AutoModelForImageTextToText.from_pretrained(local, dtype=torch.float32)
        model.config.use_cache = False
        for name, p in model.named_parameters():
            if s["freeze_vision"] and is_vision_parameter(name):
                p.requires_grad_(False)
        if s.get("gradient_checkpointing"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.engine = deepspeed_engine.initialize(model, conf)
        self.engine.train()
        self.processor = AutoProcessor.from_pretrained(local)
        from aesformer.engines import banned_token_ids

        self.banned_ids = banned_token_ids(self.processor)
        self.trainable = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        numel = sum(getattr(p, "ds_numel", p.numel()) for _, p in self.trainable)
        return {"rank": self.rank, "trainable_parameters": numel, "tensors": len(self.trainable)}

    # -- training ---------------------------------------------------------------------------
    def _forward(self, samples: Sequence[dict], weight: float, with_grad: bool):
        import torch

        from aesformer.actors.images import resolve_requests
        from aesformer.engines import response_logprobs

        ctx = torch.enable_grad() if with_grad else torch.no_grad()
        with ctx:  # each prompt of the micro-batch runs once, its responses continue it
            logp, entropy, mask = response_logprobs(
                self.engine, self.processor, resolve_requests([x["request"] for x in samples]),
                [x["response_ids"] for x in samples], self.s["temperature"], banned_ids=self.banned_ids,
                max_pixels=self.s.get("max_pixels"), with_entropy=True,
                # ZeRO-3 gathers parameters in every forward pass: every rank must run the same passes
                fixed_passes=self.s["zero_stage"] == 3)
        return logp, entropy, mask * weight

    def _micro_batches(self, samples: list[dict], filler: dict) -> list[tuple[list[dict], float]]:
        """``grad_accum`` micro-batches of at most ``micro_batch`` samples;
        empty ones carry a zero-weight filler so every rank runs the same passes."""
        mb, gas = self.s["micro_batch"], self.s["grad_accum"]
        if len(samples) > mb * gas:
            raise ValueError(f"rank {self.rank} got {len(samples)} samples for one update; at most "
                             f"micro_batch x grad_accum = {mb * gas}")
        out = []
        for k in range(gas):
            chunk = samples[k * mb:(k + 1) * mb]
            out.append((chunk, 1.0) if chunk else ([filler], 0.0))
        return out

    @staticmethod
    def _padded(rows: Sequence[Sequence[float]], like) -> Any:
        import torch

        out = torch.zeros(like.shape, dtype=torch.float32)
        for i, r in enumerate(rows):
            n = min(len(r), like.shape[1])
            out[i, :n] = torch.tensor(list(r)[:n], dtype=torch.float32)
        return out.to(like.device)

    def update(self, minibatches: Sequence[Sequence[dict]], totals: Sequence[dict], filler: dict,
               version: Optional[int] = None) -> dict:
        """Train on this rank's share of each mini-batch (one optimizer step per
        mini-batch). A sample is a dict with ``request``, ``response_ids``,
        ``rollout_logprobs``, ``ref_logprobs`` and ``advantage``; ``totals[u]``
        holds the ``tokens`` and ``sequences`` of mini-batch ``u`` over all ranks.
        Returns sums over this rank's tokens, for the driver to combine."""
        import torch

        from aesformer.grpo import grpo_loss

        s = self.s
        sums = dict(tokens=0.0, mismatch=0.0, mismatch_max=0.0, entropy=0.0, kl=0.0, clip=0.0, dual_clip=0.0,
                    pg_loss=0.0, loss=0.0, samples=0.0)
        # Log-probs of the policy before this step's updates: the "old" policy
        # of the ratio and the learner's side of the sync check. With one
        # mini-batch they come free from its own forward pass.
        old: dict[int, list[list[float]]] = {}
        separate_old = len(minibatches) > 1
        if separate_old:
            for u, samples in enumerate(minibatches):
                rows: list[list[float]] = []
                for chunk, weight in self._micro_batches(list(samples), filler):
                    logp, _, _ = self._forward(chunk, weight, with_grad=False)
                    if weight:
                        rows.extend(logp[i, :len(x["response_ids"])].float().cpu().tolist() for i, x in enumerate(chunk))
                old[u] = rows
        grad_norms = []
        for u, samples in enumerate(minibatches):
            samples = list(samples)
            offset = 0
            for chunk, weight in self._micro_batches(samples, filler):
                logp, entropy, mask = self._forward(chunk, weight, with_grad=True)
                if s.get("ratio_base") == "rollout":  # off-policy samples: the behaviour policy's own log-probs
                    old_logp = self._padded([x["rollout_logprobs"] for x in chunk], logp)
                elif separate_old and weight:
                    old_logp = self._padded(old[u][offset:offset + len(chunk)], logp)
                else:
                    old_logp = logp.detach()
                offset += len(chunk) if weight else 0
                ref = self._padded([x["ref_logprobs"] for x in chunk], logp)
                adv = torch.tensor([float(x["advantage"]) for x in chunk], dtype=torch.float32, device=logp.device)
                loss, m = grpo_loss(logp, old_logp, ref, adv, mask, kl_coef=s["kl_coef"],
                                    kl_estimator=s["kl_estimator"], mode=s["loss_agg"],
                                    clip_ratio_low=s["clip_ratio_low"], clip_ratio_high=s["clip_ratio_high"],
                                    dual_clip=s["dual_clip"], batch_tokens=totals[u]["tokens"],
                                    batch_sequences=totals[u]["sequences"], sequences=len(chunk) * weight)
                # DeepSpeed divides by grad_accum and averages over ranks; undo
                # both so the gradient is that of the mini-batch's token-mean.
                self.engine.backward(loss * self.world * s["grad_accum"])
                self.engine.step()
                with torch.no_grad():
                    n = float(mask.sum())
                    roll = self._padded([x["rollout_logprobs"] for x in chunk], logp)
                    learner_before = old_logp if separate_old else logp.detach()
                    diff = (roll - learner_before).abs() * mask
                    sums["tokens"] += n
                    sums["samples"] += len(chunk) if weight else 0
                    sums["mismatch"] += float(diff.sum())
                    sums["mismatch_max"] = max(sums["mismatch_max"], float(diff.max()) if n else 0.0)
                    sums["entropy"] += float((entropy * mask).sum())
                    sums["kl"] += float((m["kl_tokens"] * mask).sum())
                    sums["clip"] += m["clip_frac"] * n
                    sums["dual_clip"] += m["dual_clip_frac"] * n
                    sums["pg_loss"] += m["pg_loss"]
                    sums["loss"] += float(loss)
            norm_value = self.engine.get_global_grad_norm()
            if norm_value is not None:
                grad_norms.append(float(norm_value))
        sums["grad_norm"] = grad_norms[-1] if grad_norms else float("nan")
        self.version = self.version + 1 if version is None else int(version)
        return sums

    # -- weights out ------------------------------------------------------------------------
    def _chunks(self, max_bytes: int) -> list[list[tuple[str, Any]]]:
        groups, current, size = [], [], 0
        for name, p in self.trainable:
            nbytes = getattr(p, "ds_numel", p.numel()) * p.element_size()
            if current and size + nbytes > max_bytes:
                groups.append(current)
                current, size = [], 0
            current.append((name, p))
            size += nbytes
        if current:
            groups.append(current)
        return groups

    def init_transfer(self, handles: Sequence, world_sizes: Sequence[int], bucket_bytes: int) -> dict:
        """Open a weight-transfer group between rank 0 and the rollout engines
        ``handles`` (replacing any earlier group). A collective: call it on
        every rank; the others only keep the source for the gathers."""
        import torch

        from aesformer.actors.rollout import RolloutClient
        from aesformer.deepspeed_engine import GatheredSource

        if self.transfer is not None:
            self.transfer.shutdown()
            self.transfer = None
        source = GatheredSource(self.trainable, max_bytes=bucket_bytes)  # gathers of about one bucket
        client = RolloutClient(handles, world_sizes) if self.rank == 0 else None
        world = 1 + sum(int(w) for w in world_sizes)
        address, port = self.address() if self.rank == 0 else ("", 0)
        if torch.cuda.is_available():
            self.transfer = _NcclTransfer(address, port, world, self.rank, client, source, bucket_bytes)
        else:
            from aesformer.weight_sync import GlooTrainerTransfer

            self.transfer = _GlooTransfer(GlooTrainerTransfer.trainer_init(
                {"master_address": address, "master_port": port, "world_size": world, "rank": self.rank,
                 "bucket_bytes": bucket_bytes}, client=client, source=source), client)
        return {"rank": self.rank, "world_size": world, "backend": "nccl" if torch.cuda.is_available() else "gloo"}

    def send_weights(self, version: Optional[int] = None) -> Optional[dict]:
        """Send the current weights to the engines of the transfer group,
        tagged ``version`` (default: this learner's own). A collective; rank 0
        returns bytes, tensors, the send's seconds and the seconds of a raw
        in-process copy of the same tensors."""
        if self.transfer is None:
            raise RuntimeError("no weight-transfer group: call init_transfer first")
        stats = self.transfer.send(self.version if version is None else int(version))
        return stats if self.rank == 0 else None

    def get_version(self) -> int:
        return self.version

    def set_version(self, version: int) -> int:
        self.version = int(version)
        return self.version

    def checksum(self) -> Optional[str]:
        """sha256 of the trainable weights (rank 0; a collective under ZeRO-3)."""
        from aesformer.deepspeed_engine import gathered
        from aesformer.engines import pack_weights

        h = hashlib.sha256()
        for group in self._chunks(256 << 20):
            with gathered([p for _, p in group]):
                if self.rank == 0:
                    meta, buffer = pack_weights((n, p.data) for n, p in group)
                    h.update(json.dumps(meta).encode())
                    h.update(buffer)
        return h.hexdigest() if self.rank == 0 else None

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, directory: str, client_state: dict) -> bool:
        """Every rank writes its part; at a URI each rank uploads its own files."""
        from aesformer import deepspeed_engine, storage

        if not storage.is_uri(directory):
            deepspeed_engine.save_checkpoint(self.engine, directory, client_state)
            return True
        with tempfile.TemporaryDirectory(prefix="learner-checkpoint-") as local:
            deepspeed_engine.save_checkpoint(self.engine, local, client_state)
            storage.upload(local, directory)
        return True

    def load(self, directory: str) -> dict:
        """A checkpoint at a URI is downloaded to this node first."""
        from aesformer import deepspeed_engine, storage

        if not storage.is_uri(directory):
            return deepspeed_engine.load_checkpoint(self.engine, directory)
        with tempfile.TemporaryDirectory(prefix="learner-checkpoint-") as local:
            return deepspeed_engine.load_checkpoint(self.engine, storage.download(directory, Path(local) / "c"))

    def export(self, directory: str) -> Optional[str]:
        """Write the policy as a transformers model folder (rank 0), with its processor."""
        from aesformer.deepspeed_engine import gathered

        module = self.engine.module
        params = list(module.parameters())
        with gathered(params):
            if self.rank != 0:
                return None
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        from aesformer.storage import write_dir

        def save(tmp: Path) -> None:
            module.config.use_cache = True
            module.save_pretrained(str(tmp), state_dict=state)
            self.processor.save_pretrained(str(tmp))

        return write_dir(directory, save)  # a local folder or a URI


class _GlooTransfer:
    def __init__(self, engine, client):
        self.engine, self.client = engine, client

    def send(self, version: int) -> dict:
        if self.client is not None:
            self.client.version = version
        st = self.engine.send_weights(str(version))
        return {"bytes": st.bytes, "tensors": st.tensors, "seconds": st.seconds, "raw_copy_seconds": st.raw_copy_seconds,
                "parts": dict(st.parts)}

    def shutdown(self) -> None:
        self.engine.shutdown()


class _NcclTransfer:
    """vLLM 0.33's trainer-side NCCL engine (``WeightTransferTrainerFactory``,
    ``NCCLTrainerInitInfo``) fed by the layer-by-layer ZeRO-3 source; rank 0
    sends (packed buffers), the other ranks only join the gathers."""

    def __init__(self, address: str, port: int, world: int, rank: int, client, source, bucket_bytes: int):
        import time
        from functools import cached_property

        from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        from aesformer.weight_sync import RawCopy

        outer = self
        self.raw_copy = RawCopy(bucket_bytes)
        self.raw_copy_seconds = 0.0
        self.bytes = 0
        self.tensors = 0

        class Source(WeightSource):
            @cached_property
            def metadata(self):
                return [ParamMeta(n, dtype, tuple(shape)) for n, dtype, shape in source.metadata]

            def iter_full(self):
                outer.active = self._iter_full()
                return outer.active

            def _iter_full(self):
                for name, tensor in source.iter_full():
                    if rank == 0:
                        outer.raw_copy_seconds += outer.raw_copy.copy(tensor.detach())
                        outer.bytes += tensor.numel() * tensor.element_size()
                        outer.tensors += 1
                    yield name, tensor

        self.client, self.time, self.active = client, time, None
        self.source = Source()
        self.engine = WeightTransferTrainerFactory.trainer_init(
            NCCLTrainerInitInfo(master_address=address, master_port=port, world_size=world, rank=rank, packed=True,
                                packed_buffer_size_bytes=bucket_bytes),
            client=client, source=self.source)

    def send(self, version: int) -> dict:
        if self.client is not None:
            self.client.version = version
        self.raw_copy_seconds, self.bytes, self.tensors = 0.0, 0, 0
        self.raw_copy.reset()
        # from the engines' start call to their finish: the time the weights take to arrive
        t = self.time.perf_counter()
        self.active = None
        try:
            self.engine.send_weights()
        except BaseException:
            # the other ranks are still gathering layer by layer: finish the pass with them, then fail
            for _ in self.active if self.active is not None else self.source.iter_full():
                pass
            raise
        seconds = self.time.perf_counter() - t - self.raw_copy_seconds
        return {"bytes": self.bytes, "tensors": self.tensors, "seconds": seconds,
                "raw_copy_seconds": self.raw_copy_seconds}

    def shutdown(self) -> None:
        self.engine.shutdown()

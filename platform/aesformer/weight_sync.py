"""Weights from the learner to the rollout engines over a collective.

The protocol has the shape of vLLM's weight transfer (``vllm.distributed.
weight_transfer``), so the CPU path runs the same steps as the GPU path:

- init: the trainer (learner rank 0) opens a process group as rank 0 and
  every engine worker joins it at ``rank_offset + its local rank``;
- start / update / finish: the trainer announces an update, ships the
  parameters' names, dtypes and shapes (a few kB of control message) to the
  engines, broadcasts the tensors over the group while the engines receive
  them, and the engines finish the update (a vLLM engine then drops its
  cached prefixes, see ``aesformer.engines``).

On GPU the group is vLLM's NCCL transfer engine; on CPU it is a torch.distributed
gloo group built here (:class:`GlooGroup`), outside the learner's own
DeepSpeed process group. Tensors travel packed into flat byte buckets of at
most ``bucket_bytes`` (one broadcast per bucket); both sides derive the same
bucket boundaries from the metadata (:func:`bucket_plan`), so only the
metadata is sent as a message. No weight byte goes through the object store.

A source of weights is any object with ``metadata`` (``[(name, dtype,
shape)]``) and ``iter_full()`` yielding ``(name, full tensor)`` in metadata
order (``aesformer.deepspeed_engine.GatheredSource`` gathers ZeRO-3 partitions layer by
layer). Every trainer rank iterates it (the gathers are collectives); only
rank 0 sends.
"""
from __future__ import annotations

import datetime
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol, Sequence

DEFAULT_BUCKET_BYTES = 64 << 20
DEFAULT_TIMEOUT_S = 180.0  # per rendezvous or broadcast; a dead peer fails the sync within it


class WeightClient(Protocol):
    """The engines' side of the control plane, as the trainer drives it (the
    same four calls as vLLM's ``VLLMWeightSyncClient``)."""

    def init_weight_transfer_engine(self, init_info: dict) -> None: ...

    def start_weight_update(self) -> None: ...

    def update_weights(self, update_info: dict) -> None: ...

    def finish_weight_update(self, weight_version: Optional[str] = None) -> None: ...


# -- metadata and buckets ------------------------------------------------------------------

def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def update_info(metadata: Iterable[tuple[str, Any, Sequence[int]]]) -> dict:
    """The per-update control message: ``names``, ``dtype_names``, ``shapes``
    (the fields of vLLM's ``NCCLWeightTransferUpdateInfo``)."""
    names, dtypes, shapes = [], [], []
    for name, dtype, shape in metadata:
        names.append(str(name))
        dtypes.append(dtype if isinstance(dtype, str) else dtype_name(dtype))
        shapes.append([int(s) for s in shape])
    return {"names": names, "dtype_names": dtypes, "shapes": shapes}


def tensor_nbytes(dtype_name_: str, shape: Sequence[int]) -> int:
    import math

    import torch

    dtype = getattr(torch, dtype_name_, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype '{dtype_name_}'")
    return math.prod(int(s) for s in shape) * torch.empty((), dtype=dtype).element_size()


def bucket_plan(info: dict, bucket_bytes: int) -> list[list[int]]:
    """Indices of the tensors in each bucket, in order: a bucket closes when the
    next tensor would take it past ``bucket_bytes`` (a larger tensor travels
    alone). Sender and receivers compute the same plan from the same message."""
    plan: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, (dt, shape) in enumerate(zip(info["dtype_names"], info["shapes"])):
        n = tensor_nbytes(dt, shape)
        if current and size + n > bucket_bytes:
            plan.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        plan.append(current)
    return plan


def total_bytes(info: dict) -> int:
    return sum(tensor_nbytes(dt, s) for dt, s in zip(info["dtype_names"], info["shapes"]))


# -- the gloo group --------------------------------------------------------------------------

class GlooGroup:
    """A torch.distributed gloo group of its own (a TCP store rendezvous at
    ``master_address:master_port``, rank 0 hosting the store), independent of
    the process's default group: the learner's DeepSpeed group stays as it is."""

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world_size = rank, world_size
        self.store = dist.TCPStore(master_address, int(master_port), world_size, rank == 0, timeout=timeout,
                                   wait_for_workers=False)
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore("aesformer-weights", self.store), rank, world_size, timeout)

    def broadcast(self, tensor: Any, src: int = 0) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        self.pg.broadcast([tensor], opts).wait()

    def destroy(self) -> None:
        self.pg = None
        self.store = None


# -- sending and receiving ---------------------------------------------------------------------

@dataclass
class SendStats:
    bytes: int = 0
    tensors: int = 0
    buckets: int = 0
    seconds: float = 0.0  # the send loop, raw copies excluded
    raw_copy_seconds: float = 0.0  # a plain in-process copy of the same tensors


def _raw_copy_time(tensor: Any) -> float:
    """Seconds of one in-process copy of ``tensor`` (the baseline a transfer is
    compared with; the scratch allocation is not timed)."""
    import torch

    scratch = torch.empty_like(tensor)
    if tensor.is_cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    scratch.copy_(tensor)
    if tensor.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def send_packed(group: Optional[GlooGroup], pairs: Iterator[tuple[str, Any]], info: dict, bucket_bytes: int,
                measure_raw_copy: bool = True) -> SendStats:
    """Broadcast the tensors of ``pairs`` (in ``info`` order) from rank 0 in
    flat buckets. ``group=None`` (or a failed group) still drains ``pairs``, so
    the trainer-side gathers of the other ranks stay aligned; the first error
    is raised after the drain."""
    import torch

    stats = SendStats()
    plan = bucket_plan(info, bucket_bytes)
    index_of = {name: i for i, name in enumerate(info["names"])}
    error: Optional[BaseException] = None
    t0 = time.perf_counter()
    it = iter(pairs)
    for bucket in plan:
        sizes = [tensor_nbytes(info["dtype_names"][i], info["shapes"][i]) for i in bucket]
        flat = torch.empty(sum(sizes), dtype=torch.uint8) if group is not None else None
        offset = 0
        for i, n in zip(bucket, sizes):
            name, tensor = next(it)
            if index_of.get(name) != i:
                raise ValueError(f"weight source yielded '{name}' where the metadata has '{info['names'][i]}'")
            if measure_raw_copy:
                stats.raw_copy_seconds += _raw_copy_time(tensor.detach())
            if flat is not None and n:
                src = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
                flat[offset:offset + n].copy_(src.cpu() if src.device.type != "cpu" else src)
            offset += n
            stats.tensors += 1
        if group is not None and error is None:
            try:
                group.broadcast(flat, src=0)
                stats.buckets += 1
                stats.bytes += offset
            except BaseException as e:  # keep draining: the other ranks are still gathering
                error = e
    for _ in it:  # a source longer than its metadata
        raise ValueError("weight source yielded more tensors than its metadata lists")
    stats.seconds = time.perf_counter() - t0 - stats.raw_copy_seconds
    if error is not None:
        raise error
    return stats


def receive_packed(group: GlooGroup, info: dict, bucket_bytes: int,
                   load: Callable[[list[tuple[str, Any]]], Any]) -> int:
    """Receive the buckets :func:`send_packed` broadcasts and hand each
    bucket's tensors to ``load([(name, tensor)])``; returns the bytes received."""
    import torch

    received = 0
    for bucket in bucket_plan(info, bucket_bytes):
        sizes = [tensor_nbytes(info["dtype_names"][i], info["shapes"][i]) for i in bucket]
        flat = torch.empty(sum(sizes), dtype=torch.uint8)
        group.broadcast(flat, src=0)
        weights, offset = [], 0
        for i, n in zip(bucket, sizes):
            dtype = getattr(torch, info["dtype_names"][i])
            weights.append((info["names"][i], flat[offset:offset + n].view(dtype).reshape(info["shapes"][i])))
            offset += n
        load(weights)
        received += offset
    return received


# -- the two ends ---------------------------------------------------------------------------------

class GlooReceiver:
    """The engine's end (one per engine process): joins the group, receives
    updates, loads them with the engine's ``load`` callable."""

    def __init__(self, load: Callable[[list[tuple[str, Any]]], Any]):
        self.load = load
        self.group: Optional[GlooGroup] = None
        self.bucket_bytes = DEFAULT_BUCKET_BYTES
        self.active = False
        self.last_info: Optional[dict] = None

    def init_transfer_engine(self, init_info: dict) -> None:
        self.shutdown()
        self.bucket_bytes = int(init_info.get("bucket_bytes", DEFAULT_BUCKET_BYTES))
        self.group = GlooGroup(init_info["master_address"], init_info["master_port"], int(init_info["rank_offset"]),
                               int(init_info["world_size"]), float(init_info.get("timeout_s", DEFAULT_TIMEOUT_S)))

    def start_weight_update(self) -> None:
        if self.group is None:
            raise RuntimeError("weight transfer not initialised: call init_transfer_engine first")
        if self.active:
            raise RuntimeError("start_weight_update called while an update is active")
        self.active = True

    def update_weights(self, info: dict) -> int:
        if not self.active:
            raise RuntimeError("start_weight_update must come before update_weights")
        if info.get("names"):
            self.last_info = info
        elif self.last_info is None:
            raise RuntimeError("an update without metadata needs an earlier one with it")
        try:
            return receive_packed(self.group, self.last_info, self.bucket_bytes, self.load)
        except BaseException:
            self.active = False
            raise

    def finish_weight_update(self) -> None:
        if not self.active:
            raise RuntimeError("finish_weight_update without start_weight_update")
        self.active = False

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.destroy()
        self.group = None
        self.active = False


class GlooTrainerTransfer:
    """The trainer's end: ``trainer_init`` on every learner rank (rank 0 opens
    the group with the engines, the others only take part in the gathers),
    then ``send_weights`` on every rank for each update."""

    def __init__(self, client: Optional[WeightClient], source: Any, rank: int, bucket_bytes: int):
        self.client, self.source, self.rank, self.bucket_bytes = client, source, rank, bucket_bytes
        self.group: Optional[GlooGroup] = None
        self.sent_info: Optional[dict] = None

    @property
    def is_sender(self) -> bool:
        return self.rank == 0

    @classmethod
    def trainer_init(cls, init_info: dict, *, client: Optional[WeightClient], source: Any) -> "GlooTrainerTransfer":
        """``init_info``: master_address, master_port, world_size (trainer +
        every engine worker), rank (this learner rank), optional bucket_bytes
        and timeout_s."""
        engine = cls(client, source, int(init_info["rank"]), int(init_info.get("bucket_bytes", DEFAULT_BUCKET_BYTES)))
        if not engine.is_sender:
            return engine
        timeout_s = float(init_info.get("timeout_s", DEFAULT_TIMEOUT_S))
        payload = {"master_address": init_info["master_address"], "master_port": int(init_info["master_port"]),
                   "rank_offset": 1, "world_size": int(init_info["world_size"]), "bucket_bytes": engine.bucket_bytes,
                   "timeout_s": timeout_s}
        # the engines join while rank 0 opens the group: both block in the rendezvous
        with ThreadPoolExecutor(max_workers=1) as pool:
            joined = pool.submit(client.init_weight_transfer_engine, payload)
            engine.group = GlooGroup(init_info["master_address"], init_info["master_port"], 0,
                                     int(init_info["world_size"]), timeout_s)
            joined.result()
        return engine

    def send_weights(self, weight_version: Optional[str] = None) -> SendStats:
        meta = list(self.source.metadata)
        info = update_info(meta)
        if not self.is_sender:
            return send_packed(None, self.source.iter_full(), info, self.bucket_bytes, measure_raw_copy=False)
        message = {"names": [], "dtype_names": [], "shapes": []} if info == self.sent_info else info
        try:
            self.client.start_weight_update()
        except BaseException:
            # the other ranks are already gathering layer by layer: take part, then fail
            send_packed(None, self.source.iter_full(), info, self.bucket_bytes, measure_raw_copy=False)
            raise
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            received = pool.submit(self.client.update_weights, message)  # the engines receive while we send
            stats = send_packed(self.group, self.source.iter_full(), info, self.bucket_bytes)
            received.result()
        finally:
            pool.shutdown(wait=False)  # never wait on a peer stuck in a collective
        self.client.finish_weight_update(weight_version)
        self.sent_info = info
        return stats

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.destroy()
        self.group = None


def rank_offsets(world_sizes: Sequence[int], first: int = 1) -> list[int]:
    """Each engine's first rank in the transfer group: engines sit after the
    trainer (rank 0) one after another, ``world_sizes[i]`` ranks each."""
    out, at = [], first
    for w in world_sizes:
        out.append(at)
        at += int(w)
    return out

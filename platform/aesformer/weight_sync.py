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
bucket boundaries and offsets from the metadata (:class:`Layout`), so only
the metadata is sent as a message, once per group. Each side keeps two flat
buffers for as long as the group lives (:class:`FlatBuffers`): the trainer
packs bucket k+1 while bucket k is on the wire, and an engine has bucket k+1
already posted while it copies bucket k into its parameters. The engines'
``start`` call runs while the first bucket is packed. No weight byte goes
through the object store.

A transfer is judged by the time the weights take to arrive (``start``
until every engine acknowledged ``finish``) against :class:`RawCopy`: the
same tensors copied once in the trainer's process into preallocated
destinations.

A source of weights is any object with ``metadata`` (``[(name, dtype,
shape)]``) and ``iter_full()`` yielding ``(name, full tensor)`` in metadata
order (``aesformer.deepspeed_engine.GatheredSource`` gathers ZeRO-3 partitions
a few whole layers at a time). Every trainer rank iterates it (the gathers
are collectives); only rank 0 sends.
"""
from __future__ import annotations

import datetime
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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

    def broadcast(self, tensor: Any, src: int = 0, wait: bool = True) -> Any:
        """Broadcast ``tensor`` from ``src``; with ``wait=False`` return the
        pending work (its ``wait()`` ends it). Broadcasts complete in the order
        every rank issues them."""
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        work = self.pg.broadcast([tensor], opts)
        if wait:
            work.wait()
            return None
        return work

    def destroy(self) -> None:
        self.pg = None
        self.store = None


# -- sending and receiving ---------------------------------------------------------------------

ALIGN = 16  # every tensor starts at a multiple of this in its bucket, so a byte view casts to any dtype


@dataclass(frozen=True)
class Bucket:
    items: tuple[tuple[int, int, int], ...]  # (tensor index, byte offset in the bucket, bytes)
    nbytes: int  # the bucket's size, padding included


@dataclass(frozen=True)
class Layout:
    """Where every tensor of an update sits: its bucket and its offset there.
    Sender and receivers derive it alike from the control message."""
    buckets: tuple[Bucket, ...]
    tensor_bytes: int  # the tensors' bytes, padding excluded

    @classmethod
    def of(cls, info: dict, bucket_bytes: int) -> "Layout":
        sizes = [tensor_nbytes(dt, s) for dt, s in zip(info["dtype_names"], info["shapes"])]
        buckets = []
        for plan in bucket_plan(info, bucket_bytes):
            items, at = [], 0
            for i in plan:
                items.append((i, at, sizes[i]))
                at += -(-sizes[i] // ALIGN) * ALIGN
            buckets.append(Bucket(tuple(items), at))
        return cls(tuple(buckets), sum(sizes))

    @property
    def largest(self) -> int:
        return max((b.nbytes for b in self.buckets), default=0)


class FlatBuffers:
    """Flat byte buffers that outlive an update (two: one fills while the
    other travels). A buffer is allocated and touched once, the first time a
    bucket needs it, never inside later transfers."""

    def __init__(self, count: int = 2):
        self.buffers: list = [None] * count

    def get(self, slot: int, nbytes: int, device: Any = "cpu"):
        import torch

        buf = self.buffers[slot]
        if buf is None or buf.numel() < nbytes or buf.device != torch.device(device):
            buf = torch.zeros(max(nbytes, 1), dtype=torch.uint8, device=device)
            self.buffers[slot] = buf
        return buf[:nbytes]


def _typed(flat: Any, offset: int, dtype: Any, shape: Sequence[int]) -> Any:
    """The bytes of ``flat`` at ``offset`` seen as a tensor of ``dtype`` and ``shape`` (no copy)."""
    import math

    import torch

    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return flat[offset:offset + n].view(dtype).view(tuple(shape))


class RawCopy:
    """The baseline a transfer is compared with: each tensor copied once, in
    this process, into a preallocated destination (a buffer kept across
    updates and touched when allocated, so no allocation or first-touch page
    fault is timed); only the copies are timed."""

    def __init__(self, capacity: int):
        self.capacity = max(int(capacity), ALIGN)
        self.buffers = FlatBuffers(1)
        self.offset = 0
        self.seconds = 0.0

    def copy(self, tensor: Any) -> float:
        import torch

        n = tensor.numel() * tensor.element_size()
        if not n:
            return 0.0
        if n > self.capacity:  # a tensor larger than the kept buffer: its own destination, touched before the copy
            dst = torch.empty_like(tensor, memory_format=torch.contiguous_format).zero_()
        else:
            flat = self.buffers.get(0, self.capacity, tensor.device)
            if self.offset + n > flat.numel():
                self.offset = 0
            dst = _typed(flat, self.offset, tensor.dtype, tensor.shape)
            self.offset += -(-n // ALIGN) * ALIGN
        if tensor.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(tensor)
        if tensor.is_cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        self.seconds += dt
        return dt

    def reset(self) -> None:
        self.offset, self.seconds = 0, 0.0


@dataclass
class SendStats:
    bytes: int = 0
    tensors: int = 0
    buckets: int = 0
    seconds: float = 0.0  # the send loop (or, from GlooTrainerTransfer, until every engine holds the weights), raw copies excluded
    raw_copy_seconds: float = 0.0  # a plain in-process copy of the same tensors (RawCopy)
    # where ``seconds`` went on the sender: taking tensors from the source (ZeRO-3 gathers), packing
    # them, waiting for the engines' start, for broadcasts, for the engines' update and finish calls
    parts: dict = field(default_factory=dict)


def send_packed(group: Optional[GlooGroup], pairs: Iterator[tuple[str, Any]], info: dict, bucket_bytes: int,
                measure_raw_copy: bool = True, *, buffers: Optional[FlatBuffers] = None,
                raw_copy: Optional[RawCopy] = None, layout: Optional[Layout] = None,
                before_first_broadcast: Optional[Callable[[], Any]] = None) -> SendStats:
    """Broadcast the tensors of ``pairs`` (in ``info`` order) from rank 0 in
    flat buckets. Two buffers alternate: bucket k+1 is packed while bucket k
    travels. ``before_first_broadcast`` runs once, when the first bucket is
    packed (the trainer waits there for the engines to accept the update).
    ``group=None`` (or a failed group) still drains ``pairs``, so the
    trainer-side gathers of the other ranks stay aligned; the first error is
    raised after the drain."""
    stats = SendStats()
    layout = layout or Layout.of(info, bucket_bytes)
    buffers = buffers or FlatBuffers()
    if measure_raw_copy and raw_copy is None:
        raw_copy = RawCopy(layout.largest)
    if raw_copy is not None:
        raw_copy.reset()
    index_of = {name: i for i, name in enumerate(info["names"])}
    error: Optional[BaseException] = None
    pending: list = [None, None]
    gate = before_first_broadcast
    parts = dict(source=0.0, pack=0.0, start_wait=0.0, broadcast_wait=0.0)
    clock = time.perf_counter
    t0 = clock()
    it = iter(pairs)

    def settle(slot: int) -> None:
        nonlocal error
        work, pending[slot] = pending[slot], None
        if work is not None:
            t = clock()
            try:
                work.wait()
            except BaseException as e:  # keep draining: the other ranks are still gathering
                error = error or e
            parts["broadcast_wait"] += clock() - t

    for b, bucket in enumerate(layout.buckets):
        slot = b % 2
        sending = group is not None and error is None
        if sending:
            settle(slot)  # this buffer's previous bucket has left
            sending = error is None
        flat = buffers.get(slot, bucket.nbytes) if sending else None
        for i, offset, n in bucket.items:
            t = clock()
            name, tensor = next(it)
            parts["source"] += clock() - t
            if index_of.get(name) != i:
                raise ValueError(f"weight source yielded '{name}' where the metadata has '{info['names'][i]}'")
            tensor = tensor.detach()
            if raw_copy is not None:
                raw_copy.copy(tensor)
            if flat is not None and n:
                t = clock()
                _typed(flat, offset, tensor.dtype, tensor.shape).copy_(tensor)
                parts["pack"] += clock() - t
            stats.tensors += 1
        if gate is not None:
            gate, run_gate = None, gate
            t = clock()
            try:
                run_gate()
            except BaseException as e:
                error = error or e
            parts["start_wait"] += clock() - t
        if flat is not None and error is None:
            try:
                pending[slot] = group.broadcast(flat, src=0, wait=False)
                stats.buckets += 1
                stats.bytes += sum(n for _, _, n in bucket.items)
            except BaseException as e:
                error = e
    if gate is not None:  # an update without tensors
        try:
            gate()
        except BaseException as e:
            error = error or e
    for slot in range(len(pending)):
        settle(slot)
    for _ in it:  # a source longer than its metadata
        raise ValueError("weight source yielded more tensors than its metadata lists")
    stats.raw_copy_seconds = raw_copy.seconds if raw_copy is not None else 0.0
    stats.seconds = clock() - t0 - stats.raw_copy_seconds
    stats.parts = parts
    if error is not None:
        raise error
    return stats


def receive_packed(group: GlooGroup, info: dict, bucket_bytes: int,
                   load: Callable[[list[tuple[str, Any]]], Any], *, buffers: Optional[FlatBuffers] = None,
                   layout: Optional[Layout] = None) -> int:
    """Receive the buckets :func:`send_packed` broadcasts into two reused flat
    buffers (bucket k+1 is already on its way while bucket k is loaded) and
    hand each bucket's tensors, views of the buffer, to ``load([(name,
    tensor)])``, which copies them into the model; returns the bytes received."""
    import torch

    layout = layout or Layout.of(info, bucket_bytes)
    buffers = buffers or FlatBuffers()
    buckets = layout.buckets
    posted: dict[int, tuple] = {}

    def post(b: int) -> None:
        flat = buffers.get(b % 2, buckets[b].nbytes)
        posted[b] = (flat, group.broadcast(flat, src=0, wait=False))

    received = 0
    if buckets:
        post(0)
    for b, bucket in enumerate(buckets):
        if b + 1 < len(buckets):
            post(b + 1)  # into the buffer bucket k-1 was loaded from
        flat, work = posted.pop(b)
        work.wait()
        weights = [(info["names"][i], _typed(flat, offset, getattr(torch, info["dtype_names"][i]), info["shapes"][i]))
                   for i, offset, _ in bucket.items]
        load(weights)
        received += sum(n for _, _, n in bucket.items)
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
        self.layout: Optional[Layout] = None
        self.buffers = FlatBuffers()

    def init_transfer_engine(self, init_info: dict) -> None:
        self.shutdown()
        self.bucket_bytes = int(init_info.get("bucket_bytes", DEFAULT_BUCKET_BYTES))
        self.last_info = self.layout = None
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
            if info != self.last_info:
                self.layout = Layout.of(info, self.bucket_bytes)
            self.last_info = info
        elif self.last_info is None:
            raise RuntimeError("an update without metadata needs an earlier one with it")
        try:
            return receive_packed(self.group, self.last_info, self.bucket_bytes, self.load, buffers=self.buffers,
                                  layout=self.layout)
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

    def __init__(self, client: Optional[WeightClient], source: Any, rank: int, bucket_bytes: int,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        self.client, self.source, self.rank, self.bucket_bytes = client, source, rank, bucket_bytes
        self.timeout_s = timeout_s
        self.group: Optional[GlooGroup] = None
        self.sent_info: Optional[dict] = None
        self.layout: Optional[Layout] = None
        self.buffers = FlatBuffers()
        self.raw_copy: Optional[RawCopy] = None

    @property
    def is_sender(self) -> bool:
        return self.rank == 0

    @classmethod
    def trainer_init(cls, init_info: dict, *, client: Optional[WeightClient], source: Any) -> "GlooTrainerTransfer":
        """``init_info``: master_address, master_port, world_size (trainer +
        every engine worker), rank (this learner rank), optional bucket_bytes
        and timeout_s."""
        timeout_s = float(init_info.get("timeout_s", DEFAULT_TIMEOUT_S))
        engine = cls(client, source, int(init_info["rank"]), int(init_info.get("bucket_bytes", DEFAULT_BUCKET_BYTES)),
                     timeout_s)
        if not engine.is_sender:
            return engine
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
        """One update. On rank 0 the engines' ``start`` and ``update`` calls
        run in a thread while this one gathers and packs the first bucket; the
        first broadcast waits for ``start`` to succeed. ``seconds`` runs from
        the ``start`` call until every engine acknowledged ``finish`` (the
        weights arrived and are in use), the raw-copy baseline excluded."""
        import threading

        info = update_info(self.source.metadata)
        if info != self.sent_info or self.layout is None:
            self.layout = Layout.of(info, self.bucket_bytes)
        if not self.is_sender:
            return send_packed(None, self.source.iter_full(), info, self.bucket_bytes, measure_raw_copy=False,
                               layout=self.layout)
        if self.raw_copy is None or self.raw_copy.capacity < self.layout.largest:
            self.raw_copy = RawCopy(self.layout.largest)
        message = {"names": [], "dtype_names": [], "shapes": []} if info == self.sent_info else info
        t0 = time.perf_counter()
        started = threading.Event()
        refused: list[BaseException] = []

        def engines() -> None:
            try:
                self.client.start_weight_update()
            except BaseException as e:
                refused.append(e)
                raise
            finally:
                started.set()
            self.client.update_weights(message)  # the engines receive while we send

        def wait_started() -> None:
            if not started.wait(self.timeout_s):
                raise TimeoutError(f"the engines did not accept the update within {self.timeout_s:.0f}s")
            if refused:
                raise refused[0]

        pool = ThreadPoolExecutor(max_workers=1)
        try:
            received = pool.submit(engines)
            stats = send_packed(self.group, self.source.iter_full(), info, self.bucket_bytes, buffers=self.buffers,
                                raw_copy=self.raw_copy, layout=self.layout, before_first_broadcast=wait_started)
            t = time.perf_counter()
            received.result()
            stats.parts["update_wait"] = time.perf_counter() - t
        finally:
            pool.shutdown(wait=False)  # never wait on a peer stuck in a collective
        t = time.perf_counter()
        self.client.finish_weight_update(weight_version)
        stats.parts["finish"] = time.perf_counter() - t
        stats.seconds = time.perf_counter() - t0 - stats.raw_copy_seconds
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

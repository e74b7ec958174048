"""The weight-transfer protocol on CPU: a gloo group between the trainer
(rank 0) and the engines' receivers, vLLM's init / start / update / finish
steps, weights packed in buckets both sides plan alike, and a ZeRO-3-style
source that hands out one layer at a time."""
from __future__ import annotations

import socket
import threading

import pytest
import torch

from aesformer.deepspeed_engine import GatheredSource, layer_key
from aesformer.weight_sync import (FlatBuffers, GlooReceiver, GlooTrainerTransfer, Layout, RawCopy, bucket_plan,
                                   rank_offsets, total_bytes, update_info)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Model(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(50, 16)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(3))
        self.head = torch.nn.Linear(16, 50, bias=False)


def _loader(model, log):
    params = dict(model.named_parameters())

    def load(pairs):
        log.append([n for n, _ in pairs])
        with torch.no_grad():
            for name, tensor in pairs:
                params[name].copy_(tensor)

    return load


class ThreadClient:
    """The engines' control plane, in threads of this process (the job's
    RolloutClient makes the same calls on Ray actors)."""

    def __init__(self, receivers):
        self.receivers, self.calls = receivers, []

    def _each(self, fn):
        errors = []

        def run(i, r):
            try:
                fn(i, r)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i, r)) for i, r in enumerate(self.receivers)]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        if errors:
            raise errors[0]

    def init_weight_transfer_engine(self, info):
        self.calls.append("init")
        offsets = rank_offsets([1] * len(self.receivers), first=info["rank_offset"])
        self._each(lambda i, r: r.init_transfer_engine({**info, "rank_offset": offsets[i]}))

    def start_weight_update(self):
        self.calls.append("start")
        self._each(lambda i, r: r.start_weight_update())

    def update_weights(self, info):
        self.calls.append(("update", len(info["names"])))
        self._each(lambda i, r: r.update_weights(info))

    def finish_weight_update(self, version=None):
        self.calls.append(("finish", version))
        self._each(lambda i, r: r.finish_weight_update())


def test_buckets_close_before_the_limit_and_a_large_tensor_travels_alone():
    info = update_info([("a", torch.float32, [10]), ("b", torch.float32, [10]), ("c", torch.float32, [100]),
                        ("d", torch.bfloat16, [4])])
    assert total_bytes(info) == 40 + 40 + 400 + 8
    assert bucket_plan(info, 100) == [[0, 1], [2], [3]]
    assert bucket_plan(info, 1 << 20) == [[0, 1, 2, 3]]
    assert info["dtype_names"] == ["float32", "float32", "float32", "bfloat16"]


def test_every_tensor_starts_aligned_in_its_bucket_so_mixed_dtypes_share_one():
    info = update_info([("a", torch.bfloat16, [3]), ("b", torch.float32, [5]), ("c", torch.int64, [1])])
    layout = Layout.of(info, 1 << 20)
    assert [b.items for b in layout.buckets] == [((0, 0, 6), (1, 16, 20), (2, 48, 8))]
    assert layout.buckets[0].nbytes == 64 and layout.tensor_bytes == 34


def test_flat_buffers_are_kept_across_updates_and_grow_only_when_needed():
    buffers = FlatBuffers()
    first = buffers.get(0, 100)
    assert buffers.get(0, 60).data_ptr() == first.data_ptr()  # a smaller bucket reuses the buffer
    assert buffers.get(1, 100).data_ptr() != first.data_ptr()  # the other slot is a buffer of its own
    assert buffers.get(0, 200).numel() == 200


def test_the_raw_copy_baseline_copies_each_tensor_into_a_kept_destination():
    raw = RawCopy(capacity=1 << 12)
    tensors = [torch.randn(16, 16), torch.randn(300), torch.randn(2000)]  # the last is larger than the buffer
    for t in tensors:
        assert raw.copy(t) >= 0
    kept = raw.buffers.buffers[0]
    assert raw.seconds > 0
    raw.reset()
    raw.copy(tensors[0])
    assert raw.buffers.buffers[0].data_ptr() == kept.data_ptr() and raw.seconds > 0
    assert torch.equal(kept[:1024].view(torch.float32).view(16, 16), tensors[0])


def test_the_source_groups_parameters_by_layer():
    assert layer_key("model.language_model.layers.3.mlp.up_proj.weight") == "model.language_model.layers.3"
    assert layer_key("lm_head.weight") == "lm_head"
    groups = GatheredSource(Model(0).named_parameters()).layers()
    assert [[n for n, _ in g] for g in groups] == [
        ["embed.weight"], ["layers.0.weight", "layers.0.bias"], ["layers.1.weight", "layers.1.bias"],
        ["layers.2.weight", "layers.2.bias"], ["head.weight"]]
    # with a byte budget, consecutive layers share one gather (a larger layer still gets its own)
    linear = (16 * 16 + 16) * 4
    merged = GatheredSource(Model(0).named_parameters(), max_bytes=2 * linear).groups()
    assert [[n for n, _ in g] for g in merged] == [
        ["embed.weight"], ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"],
        ["layers.2.weight", "layers.2.bias"], ["head.weight"]]


@pytest.mark.timeout(120)
def test_gloo_transfer_gives_every_engine_the_trainers_weights_in_four_steps():
    trainer, engines = Model(0), [Model(1), Model(2)]
    loads = [[], []]
    receivers = [GlooReceiver(_loader(m, log)) for m, log in zip(engines, loads)]
    client = ThreadClient(receivers)
    bucket = 16 * 16 * 4 + 16 * 4  # one Linear layer per bucket
    sender = GlooTrainerTransfer.trainer_init(
        {"master_address": "127.0.0.1", "master_port": _port(), "world_size": 3, "rank": 0, "bucket_bytes": bucket},
        client=client, source=GatheredSource(trainer.named_parameters()))
    stats = sender.send_weights("1")
    for engine in engines:
        for (name, p), q in zip(trainer.named_parameters(), engine.parameters()):
            assert torch.equal(p, q), name
    expected = sum(p.numel() * 4 for p in trainer.parameters())
    assert stats.bytes == expected and stats.tensors == 8 and stats.buckets == 5
    assert stats.raw_copy_seconds > 0
    assert loads[0][1] == ["layers.0.weight", "layers.0.bias"]  # loaded bucket by bucket
    assert client.calls == ["init", "start", ("update", 8), ("finish", "1")]

    # a second update sends the tensors only: the engines reuse the metadata
    with torch.no_grad():
        for p in trainer.parameters():
            p.mul_(-2.0)
    sender.send_weights("2")
    assert client.calls[-3:] == ["start", ("update", 0), ("finish", "2")]
    for engine in engines:
        assert all(torch.equal(p, q) for p, q in zip(trainer.parameters(), engine.parameters()))


@pytest.mark.timeout(120)
def test_a_new_group_reaches_a_fresh_engine_and_an_engine_without_a_group_is_refused():
    trainer, fresh = Model(0), Model(3)
    receiver = GlooReceiver(_loader(fresh, []))
    with pytest.raises(RuntimeError, match="init"):
        receiver.start_weight_update()
    sender = GlooTrainerTransfer.trainer_init(
        {"master_address": "127.0.0.1", "master_port": _port(), "world_size": 2, "rank": 0},
        client=ThreadClient([receiver]), source=GatheredSource(trainer.named_parameters()))
    sender.send_weights("5")
    assert all(torch.equal(p, q) for p, q in zip(trainer.parameters(), fresh.parameters()))


@pytest.mark.timeout(60)
def test_an_engine_that_refuses_the_update_fails_the_send_before_any_broadcast():
    """The engines' start call runs while the first bucket is packed; the first
    broadcast waits for it, so a refusal fails the send at once instead of a
    broadcast waiting for a peer that never receives."""
    trainer = Model(0)
    receiver = GlooReceiver(_loader(Model(1), []))

    class Refusing(ThreadClient):
        def start_weight_update(self):
            self.calls.append("start")
            raise RuntimeError("the engine refused the update")

    client = Refusing([receiver])
    sender = GlooTrainerTransfer.trainer_init(
        {"master_address": "127.0.0.1", "master_port": _port(), "world_size": 2, "rank": 0, "bucket_bytes": 1088},
        client=client, source=GatheredSource(trainer.named_parameters()))
    with pytest.raises(RuntimeError, match="refused"):
        sender.send_weights("1")
    assert client.calls == ["init", "start"]


def test_other_trainer_ranks_only_iterate_the_source():
    trainer = Model(0)
    seen = []

    class Counting(GatheredSource):
        def iter_full(self):
            for name, t in super().iter_full():
                seen.append(name)
                yield name, t

    follower = GlooTrainerTransfer.trainer_init({"master_address": "", "master_port": 0, "world_size": 3, "rank": 1},
                                                client=None, source=Counting(trainer.named_parameters()))
    stats = follower.send_weights("1")
    assert len(seen) == 8 and stats.bytes == 0 and follower.group is None


def test_a_failed_start_still_takes_part_in_every_gather_then_fails():
    """An engine that died makes the control call fail; the other learner
    ranks are already gathering layer by layer, so rank 0 finishes the pass
    with them (or they would wait forever) and then reports the failure."""
    seen = []

    class Counting(GatheredSource):
        def iter_full(self):
            for name, t in super().iter_full():
                seen.append(name)
                yield name, t

    class DeadEngine(ThreadClient):
        def start_weight_update(self):
            raise RuntimeError("the engine died")

    sender = GlooTrainerTransfer(DeadEngine([]), Counting(Model(0).named_parameters()), rank=0, bucket_bytes=1 << 20)
    with pytest.raises(RuntimeError, match="died"):
        sender.send_weights("3")
    assert len(seen) == 8

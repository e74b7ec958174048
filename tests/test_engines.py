"""The engine interface: generate / score_tokens / update_weights behave the
same on every engine; the HF engine runs here, the vLLM engine on a GPU."""
from __future__ import annotations

import importlib
import inspect
import json
import os

import pytest
import torch

from aesformer.engines import (VLLM_API, Completion, SamplingSettings, make_engine, pack_weights, policy_inputs,
                               sequence_logprobs, unpack_weights)
from aesformer.samples import sample_photo


@pytest.fixture(scope="module")
def thinker(tiny_models):
    return make_engine("hf", tiny_models["thinker"])


@pytest.fixture(scope="module")
def requests_():
    return [
        {"images": [sample_photo("coffee").resize((96, 64))], "text": "Plan a better framing."},
        {"images": [sample_photo("chelsea").resize((64, 64))], "text": "Describe the photo."},
    ]


def digit_ids(tokenizer):
    return [tokenizer.convert_tokens_to_ids(d) for d in "012345"]


def test_generate_returns_n_completions_per_request_with_one_logprob_per_token(thinker, requests_):
    out = thinker.generate(requests_, SamplingSettings(n=3, max_tokens=12, seed=0))
    assert len(out) == 2 and all(len(group) == 3 for group in out)
    for group in out:
        for c in group:
            assert isinstance(c, Completion)
            assert 1 <= len(c.token_ids) <= 12
            assert len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0.0 for lp in c.logprobs)
            assert c.finish_reason in ("stop", "length")
            assert (c.finish_reason == "length") == (len(c.token_ids) == 12 and c.token_ids[-1] not in thinker.eos_ids)


def test_same_seed_same_completions_other_seed_other_completions(thinker, requests_):
    a = thinker.generate(requests_, {"n": 2, "max_tokens": 10, "seed": 7})
    b = thinker.generate(requests_, {"n": 2, "max_tokens": 10, "seed": 7})
    c = thinker.generate(requests_, {"n": 2, "max_tokens": 10, "seed": 8})
    ids = lambda out: [x.token_ids for g in out for x in g]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 0.95)])
def test_learner_logprobs_match_engine_logprobs(thinker, requests_, temperature, top_p):
    """The learner's forward pass recomputes the engine's log-probs of the
    sampled tokens to float32 precision (< 1e-4)."""
    out = thinker.generate(requests_, SamplingSettings(n=2, max_tokens=16, temperature=temperature, top_p=top_p, seed=1))
    flat = [c for g in out for c in g]
    reqs = [r for r in requests_ for _ in range(2)]
    inputs = policy_inputs(thinker.processor, reqs, [c.token_ids for c in flat])
    with torch.no_grad():
        logp = sequence_logprobs(thinker.model, inputs, temperature=temperature, banned_ids=thinker.banned_ids)
    assert logp.shape == inputs["response_mask"].shape
    for i, c in enumerate(flat):
        assert torch.allclose(logp[i, :len(c.token_ids)], torch.tensor(c.logprobs), atol=1e-4)
        assert float(logp[i, len(c.token_ids):].abs().sum()) == 0.0


def test_vision_placeholders_are_never_sampled_and_masked_alike(tiny_models, requests_):
    """A response holding <|image_pad|> would break the learner's forward
    pass; the engine masks these ids, and the learner masks them the same way."""
    engine = make_engine("hf", tiny_models["thinker"])
    pad = engine.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert pad in engine.banned_ids
    with torch.no_grad():  # make the placeholder by far the likeliest token
        engine.model.lm_head.weight[pad] = 50.0 * engine.model.lm_head.weight[pad].sign()
    out = engine.generate(requests_, SamplingSettings(n=2, max_tokens=8, seed=0))
    flat = [c for g in out for c in g]
    assert all(not set(c.token_ids) & set(engine.banned_ids) for c in flat)
    inputs = policy_inputs(engine.processor, [r for r in requests_ for _ in range(2)], [c.token_ids for c in flat])
    with torch.no_grad():
        logp = sequence_logprobs(engine.model, inputs, banned_ids=engine.banned_ids)
    for i, c in enumerate(flat):
        assert torch.allclose(logp[i, :len(c.token_ids)], torch.tensor(c.logprobs), atol=1e-4)


def test_score_tokens_reads_the_first_generated_position(thinker, requests_):
    """[B, K] log-probs; each equals the log-prob of that single token as a
    one-token response, computed by the learner's code path."""
    ids = digit_ids(thinker.processor.tokenizer)
    reqs = requests_ + [{"text": "Text only: reply with one digit."}]
    scores = thinker.score_tokens(reqs, ids)
    assert scores.shape == (3, 6)
    assert bool((scores < 0).all())
    inputs = policy_inputs(thinker.processor, [reqs[2]] * 6, [[t] for t in ids])
    with torch.no_grad():
        single = sequence_logprobs(thinker.model, inputs)[:, 0]
    assert torch.allclose(scores[2], single, atol=1e-4)


def test_update_weights_loads_packed_tensors_in_place(tiny_models, requests_):
    engine = make_engine("hf", tiny_models["thinker"])
    source = make_engine("hf", tiny_models["thinker"])
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in source.model.named_parameters():
            if "lm_head" in name or "language_model.layers.0" in name:
                p.add_(0.05 * torch.randn_like(p))
    chosen = [(n, p) for n, p in source.model.named_parameters() if "lm_head" in n or "language_model.layers.0" in n]
    meta, buffer = pack_weights(chosen)
    json.dumps(meta)  # the description is plain JSON
    assert isinstance(buffer, bytes) and len(buffer) == sum(p.numel() * 4 for _, p in chosen)
    ids = digit_ids(engine.processor.tokenizer)
    before = engine.score_tokens(requests_, ids)
    assert engine.update_weights(meta, buffer) == len(chosen)
    after = engine.score_tokens(requests_, ids)
    assert torch.allclose(after, source.score_tokens(requests_, ids), atol=1e-6)
    assert not torch.allclose(before, after, atol=1e-3)
    with pytest.raises(KeyError, match="no parameter 'nope'"):
        engine.update_weights(*pack_weights([("nope", torch.zeros(2))]))


def test_pack_unpack_round_trip_keeps_dtype_shape_and_values():
    tensors = [("a", torch.arange(6, dtype=torch.float32).reshape(2, 3)),
               ("b", torch.tensor([1.5, -2.25], dtype=torch.bfloat16)),
               ("c", torch.tensor([[3]], dtype=torch.int64)), ("empty", torch.zeros(0))]
    meta, buffer = pack_weights(tensors)
    back = unpack_weights(json.loads(json.dumps(meta)), buffer)
    assert [n for n, _ in back] == ["a", "b", "c", "empty"]
    for (_, x), (_, y) in zip(tensors, back):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    with pytest.raises(ValueError, match="runs past the end"):
        unpack_weights(meta, buffer[:10])


def test_unknown_engine_and_missing_vllm_are_named():
    with pytest.raises(ValueError, match="unknown engine 'tgi'"):
        make_engine("tgi", "x")
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(RuntimeError, match="vllm"):
            make_engine("vllm", "x")


def test_sampling_settings_reject_unknown_keys():
    with pytest.raises(ValueError, match="top_k"):
        SamplingSettings.of({"top_k": 5})


# -- vLLM --------------------------------------------------------------------------------

def _parameters_of(obj) -> set[str]:
    names: set[str] = set()
    for attr in ("__struct_fields__", "__dataclass_fields__", "__annotations__"):
        names.update(getattr(obj, attr, None) or ())
    for cls in getattr(obj, "__mro__", ()):
        names.update(getattr(cls, "__annotations__", {}) or {})
    try:
        names.update(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        pass
    return names


def test_every_vllm_name_the_adapter_uses_exists():
    pytest.importorskip("vllm")
    missing = []
    for module_name, classes in VLLM_API.items():
        module = importlib.import_module(module_name)
        for cls_name, members in classes.items():
            cls = getattr(module, cls_name, None)
            if cls is None:
                missing.append(f"{module_name}.{cls_name}")
                continue
            params = _parameters_of(cls)
            for m in members:
                if m not in params and not hasattr(cls, m):
                    missing.append(f"{module_name}.{cls_name}.{m}")
    assert not missing, f"vLLM lacks: {', '.join(missing)}"


@pytest.fixture(scope="module")
def vllm_engine(tiny_models):
    pytest.importorskip("vllm")
    path = os.environ.get("AESFORMER_VLLM_TEST_MODEL") or tiny_models["thinker"]
    return make_engine("vllm", path, gpu_memory_utilization=0.3, max_model_len=2048, enforce_eager=True,
                       dtype="float32")


@pytest.mark.gpu
def test_vllm_generate_matches_interface(vllm_engine, requests_):
    out = vllm_engine.generate(requests_, SamplingSettings(n=3, max_tokens=12, seed=0))
    assert len(out) == 2 and all(len(g) == 3 for g in out)
    for g in out:
        for c in g:
            assert len(c.logprobs) == len(c.token_ids) >= 1
            assert all(lp <= 0 for lp in c.logprobs)


@pytest.mark.gpu
def test_vllm_logprobs_agree_with_the_hf_forward_pass(vllm_engine, tiny_models, requests_):
    if os.environ.get("AESFORMER_VLLM_TEST_MODEL"):
        pytest.skip("compares against the tiny thinker")
    hf = make_engine("hf", tiny_models["thinker"], device="cuda")
    out = vllm_engine.generate(requests_, SamplingSettings(n=2, max_tokens=12, seed=0))
    flat = [c for g in out for c in g]
    inputs = policy_inputs(hf.processor, [r for r in requests_ for _ in range(2)], [c.token_ids for c in flat])
    with torch.no_grad():
        logp = sequence_logprobs(hf.model, inputs).cpu()
    for i, c in enumerate(flat):
        assert torch.allclose(logp[i, :len(c.token_ids)], torch.tensor(c.logprobs), atol=2e-2)


@pytest.mark.gpu
def test_vllm_score_tokens_gives_the_candidates_logprobs(vllm_engine, requests_):
    ids = digit_ids(vllm_engine.processor.tokenizer)
    scores = vllm_engine.score_tokens(requests_ + [{"text": "Reply with one digit."}], ids)
    assert scores.shape == (3, 6)
    assert bool(torch.isfinite(scores).all()) and bool((scores <= 0).all())
    assert float(torch.logsumexp(scores, dim=-1).max()) <= 1e-4


@pytest.mark.gpu
def test_vllm_update_weights_changes_the_outputs_in_place(vllm_engine, tiny_models, requests_):
    if os.environ.get("AESFORMER_VLLM_TEST_MODEL"):
        pytest.skip("perturbs the tiny thinker's head")
    hf = make_engine("hf", tiny_models["thinker"])
    ids = digit_ids(hf.processor.tokenizer)
    before = vllm_engine.score_tokens(requests_, ids)
    head = dict(hf.model.named_parameters())["lm_head.weight"]
    with torch.no_grad():
        head[ids[3]] += 5.0 * head.norm(dim=1).mean() / head[ids[3]].norm()  # make "3" far more likely
    assert vllm_engine.update_weights(*pack_weights([("lm_head.weight", head)])) >= 1
    after = vllm_engine.score_tokens(requests_, ids)
    assert bool((after[:, 3] > before[:, 3] + 0.5).all())
    assert torch.allclose(after, hf.score_tokens(requests_, ids), atol=5e-2)


def _every_layer_changed(path, out_dir, scale=0.05):
    """The model at ``path`` with every parameter moved by seeded noise, saved
    to ``out_dir`` with its processor; returns the (name, tensor) pairs."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 else 1.0))
    model.save_pretrained(out_dir)
    AutoProcessor.from_pretrained(path).save_pretrained(out_dir)
    return [(n, p.detach().clone()) for n, p in model.named_parameters()]


@pytest.mark.gpu
def test_vllm_prompt_seen_before_an_update_of_every_layer_scores_as_on_a_fresh_engine(tiny_models, requests_,
                                                                                       tmp_path):
    """Uses LLM(limit_mm_per_prompt={"image": 1, "video": 0}, weight_transfer_config=...,
    enable_prefix_caching=True), LLM.generate (SamplingParams.logprob_token_ids,
    logprobs), LLM.collective_rpc (the in-place load) and LLM.reset_prefix_cache."""
    pytest.importorskip("vllm")
    opts = dict(gpu_memory_utilization=0.25, max_model_len=2048, enforce_eager=True, dtype="float32",
                enable_prefix_caching=True)
    engine = make_engine("vllm", tiny_models["thinker"], **opts)
    ids = digit_ids(engine.processor.tokenizer)
    old = engine.score_tokens(requests_, ids)  # fills the prefix cache with these prompts
    engine.score_tokens(requests_, ids)
    weights = _every_layer_changed(tiny_models["thinker"], tmp_path / "new")
    assert engine.update_weights(*pack_weights(weights)) >= len(weights) - 1
    updated = engine.score_tokens(requests_, ids)
    sampled = engine.generate(requests_, SamplingSettings(n=1, max_tokens=8, temperature=1e-6, seed=0))
    engine.shutdown()
    fresh = make_engine("vllm", str(tmp_path / "new"), **opts)
    expected = fresh.score_tokens(requests_, ids)
    assert not torch.allclose(old, expected, atol=1e-2)  # the update matters for these prompts
    assert torch.allclose(updated, expected, atol=1e-3)
    again = fresh.generate(requests_, SamplingSettings(n=1, max_tokens=8, temperature=1e-6, seed=0))
    assert [g[0].token_ids for g in sampled] == [g[0].token_ids for g in again]


@pytest.mark.gpu
def test_vllm_receives_every_layer_over_nccl_from_a_trainer_on_another_gpu(tiny_models, requests_, tmp_path):
    """The rollout path of GRPO-A on GPU: vLLM 0.33's trainer engine
    (WeightTransferTrainerFactory.trainer_init with NCCLTrainerInitInfo, a
    WeightSource, send_weights) drives the engine's collective_rpc calls
    init_weight_transfer_engine / start_weight_update / update_weights /
    finish_weight_update, then LLM.reset_prefix_cache."""
    pytest.importorskip("vllm")
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs the trainer and the engine on different GPUs")
    from functools import cached_property

    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    from aesformer.weight_sync import rank_offsets

    opts = dict(gpu_memory_utilization=0.25, max_model_len=2048, enforce_eager=True, dtype="float32")
    engine = make_engine("vllm", tiny_models["thinker"], **opts)
    ids = digit_ids(engine.processor.tokenizer)
    engine.score_tokens(requests_, ids)
    weights = _every_layer_changed(tiny_models["thinker"], tmp_path / "new")
    torch.cuda.set_device(1)
    on_gpu = [(n, t.to("cuda:1")) for n, t in weights]

    class Source(WeightSource):
        @cached_property
        def metadata(self):
            return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in on_gpu]

        def iter_full(self):
            yield from on_gpu

    class Client:
        def init_weight_transfer_engine(self, info):
            engine.init_weight_transfer({**info, "rank_offset": rank_offsets([1])[0]})

        def start_weight_update(self):
            engine.start_weight_update()

        def update_weights(self, info):
            engine.receive_weights(info)

        def finish_weight_update(self, weight_version=None):
            engine.finish_weight_update()

    from aesformer.actors.learner import _free_port

    sender = WeightTransferTrainerFactory.trainer_init(
        NCCLTrainerInitInfo(master_address="127.0.0.1", master_port=_free_port(), world_size=2, rank=0),
        client=Client(), source=Source())
    sender.send_weights()
    updated = engine.score_tokens(requests_, ids)
    sender.shutdown()
    engine.shutdown()
    fresh = make_engine("vllm", str(tmp_path / "new"), **opts)
    assert torch.allclose(updated, fresh.score_tokens(requests_, ids), atol=1e-3)

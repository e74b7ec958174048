"""Batches that cost less than their parts: a prompt runs once for all its
continuations, rows are grouped by length, and a batched call of the HF
engine is never slower than the same requests one at a time, with the same
results."""
from __future__ import annotations

import time

import pytest
import torch

from aesformer.continuations import length_buckets
from aesformer.engines import make_engine, policy_inputs, response_logprobs, sequence_logprobs
from aesformer.samples import sample_photo


def test_length_buckets_keep_padding_within_a_quarter_of_the_real_tokens():
    lengths = [10, 300, 12, 290, 11, 280, 40]
    buckets = length_buckets(lengths, max_batch=8)
    assert sorted(i for b in buckets for i in b) == list(range(7))
    for b in buckets:
        assert len(b) * max(lengths[i] for i in b) <= 1.25 * sum(lengths[i] for i in b)
    assert [sorted(lengths[i] for i in b) for b in buckets] == [[10, 11, 12], [40], [280, 290, 300]]


def test_length_buckets_respect_the_batch_size():
    assert [len(b) for b in length_buckets([5] * 7, max_batch=3)] == [3, 3, 1]


@pytest.fixture(scope="module")
def thinker(tiny_models):
    return make_engine("hf", tiny_models["thinker"], max_pixels=16384)


@pytest.fixture(scope="module")
def photos():
    return [sample_photo(name).resize(size) for name, size in
            (("coffee", (160, 96)), ("chelsea", (96, 96)), ("astronaut", (96, 160)))]


def mixed_groups(photos, n=4):
    """Three prompts of different lengths, ``n`` responses of mixed length each."""
    g = torch.Generator().manual_seed(0)
    requests = [{"images": [p], "text": "Plan a better photo. " * (1 + 3 * i)} for i, p in enumerate(photos)]
    rows = [r for r in requests for _ in range(n)]
    responses = [torch.randint(10, 900, (int(torch.randint(2, 60, (1,), generator=g)),), generator=g).tolist()
                 for _ in rows]
    return rows, responses


@pytest.mark.parametrize("fixed_passes", [False, True])
def test_each_prompt_once_gives_the_full_sequences_log_probs(thinker, photos, fixed_passes):
    rows, responses = mixed_groups(photos)
    with torch.no_grad():
        full = sequence_logprobs(thinker.model, policy_inputs(thinker.processor, rows, responses, 16384), 0.8,
                                 banned_ids=thinker.banned_ids)
        shared, _, mask = response_logprobs(thinker.model, thinker.processor, rows, responses, 0.8,
                                            banned_ids=thinker.banned_ids, max_pixels=16384, max_batch=3,
                                            fixed_passes=fixed_passes)
    assert shared.shape == full.shape
    assert float(((shared - full).abs() * mask).max()) < 1e-5


def test_generate_of_mixed_prompts_in_one_call_equals_each_alone(thinker, photos):
    requests = [{"images": [p], "text": "Plan a better photo. " * (1 + 3 * i)} for i, p in enumerate(photos)]
    greedy = {"n": 2, "temperature": 0.0, "max_tokens": 24}
    together = thinker.generate(requests, greedy)
    for request, group in zip(requests, together):
        alone = thinker.generate([request], greedy)[0]
        assert [c.token_ids for c in group] == [c.token_ids for c in alone]
        assert max(abs(a - b) for c, d in zip(group, alone) for a, b in zip(c.logprobs, d.logprobs)) < 1e-5


def judge_requests(photos):
    """A judge's step: per photo, five plans of mixed length after the same
    instructions and photo; then text-only requests of mixed length."""
    g = torch.Generator().manual_seed(1)
    words = ["crop", "tighter", "rotate", "left", "lower", "angle", "subject", "centre", "brighter", "step"]

    def plan():
        k = int(torch.randint(3, 80, (1,), generator=g))
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (k,), generator=g))

    out = [{"images": [p], "text": f"The photo above and this plan for editing it:\n{plan()}\nScore it from 0 to 5."}
           for p in photos for _ in range(5)]
    out += [{"text": f"Compare the plans.\nPlan: {plan()}\nReference: {plan()}\nScore from 0 to 5."} for _ in range(6)]
    return out


def best_of(k, fn):
    times = []
    for _ in range(k):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def test_batched_score_tokens_is_never_slower_than_one_at_a_time(thinker, photos):
    requests = judge_requests(photos)
    ids = [thinker.tokenizer().convert_tokens_to_ids(d) for d in "012345"]
    thinker.score_tokens(requests[:2], ids)  # warm up
    batched_s, batched = best_of(3, lambda: thinker.score_tokens(requests, ids))
    single_s, single = best_of(3, lambda: torch.cat([thinker.score_tokens([r], ids) for r in requests]))
    assert float((batched - single).abs().max()) < 1e-4
    assert batched_s <= 1.1 * single_s, f"batched {batched_s:.3f}s, one at a time {single_s:.3f}s"


def test_batched_generate_is_never_slower_than_one_at_a_time(thinker, photos):
    requests = [{"images": [p], "text": "Plan a better photo. " * (1 + 3 * i)} for i, p in enumerate(photos)]
    sampling = {"n": 4, "temperature": 1.0, "max_tokens": 32, "seed": 0}
    thinker.generate(requests[:1], {**sampling, "max_tokens": 2})  # warm up
    batched_s, _ = best_of(3, lambda: thinker.generate(requests, sampling))
    single_s, _ = best_of(3, lambda: [thinker.generate([r], sampling) for r in requests])
    assert batched_s <= 1.1 * single_s, f"batched {batched_s:.3f}s, one at a time {single_s:.3f}s"

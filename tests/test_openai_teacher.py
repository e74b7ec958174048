"""The ``openai`` teacher and judge against a real HTTP server on 127.0.0.1
that speaks the chat-completions protocol and answers from the tiny VLM
(tests/openai_faults.py, which injects faults on request): images inline, retries on 429 / timeouts /
malformed replies, feedback rounds, the spending cap."""
from __future__ import annotations

import json
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from aesformer.distill.cache import PlanCache
from aesformer.distill.chat import Budget, OpenAIChat
from aesformer.distill.loop import feedback_loop
from aesformer.distill.measured import measure_pair
from aesformer.distill.teachers import ChatTeacher, MeasuredTeacher, PairTask
from aesformer.distill.validator import Judge, Validator
from aesformer.engines import make_engine
from aesformer.samples import sample_photos
from aesformer.synth import poor_framing
from openai_faults import FaultyChatServer

pytestmark = pytest.mark.timeout(300)
TIMEOUT_FAULT_CLIENT_S = 5.0


@pytest.fixture(scope="module")
def thinker_server(tiny_models):
    # an injected timeout holds the request longer than TIMEOUT_FAULT_CLIENT_S
    with FaultyChatServer(make_engine("hf", tiny_models["thinker"]), "tiny-thinker", fault_delay_s=8.0) as server:
        yield server


@pytest.fixture(scope="module")
def judge_server(tiny_models):
    with FaultyChatServer(make_engine("hf", tiny_models["judge"]), "tiny-judge") as server:
        yield server


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(3)
    out = []
    for name, photo in sample_photos(4):
        good = photo.resize((128, round(128 * photo.height / photo.width)), Image.BICUBIC)
        poor, _ = poor_framing(good, rng)
        out.append((name, poor, good, measure_pair(poor, good)))
    return out


def tasks_for(pairs, n, transcript="Step back a little before you shoot"):
    return [PairTask(f"key-{name}", name, poor, good, transcript, m) for name, poor, good, m in pairs[:n]]


def client(server, budget=None, **kw):
    opts = dict(timeout_s=60.0, max_retries=3, backoff_s=0.05, concurrency=1, budget=budget or Budget(),
                api_key_env=None)
    opts.update(kw)
    return OpenAIChat(server.base_url, server.model_name, **opts)


def teacher(server, budget=None, **kw):
    return ChatTeacher(client(server, budget, **kw), kind="openai", temperature=1.0, top_p=1.0, max_tokens=48, seed=0)


def statuses(server, since):
    return [r["status"] for r in server.requests[since:]]


def test_server_speaks_the_protocol(thinker_server):
    with urllib.request.urlopen(thinker_server.base_url + "/models", timeout=10) as r:
        assert json.loads(r.read())["data"][0]["id"] == "tiny-thinker"
    body = json.dumps({"model": "tiny-thinker", "max_tokens": 5, "seed": 1,
                       "messages": [{"role": "user", "content": "Describe a photo."}]}).encode()
    req = urllib.request.Request(thinker_server.base_url + "/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        reply = json.loads(r.read())
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
    assert 1 <= reply["usage"]["completion_tokens"] <= 5 and reply["usage"]["prompt_tokens"] > 0


def test_teacher_sends_both_photos_inline_and_the_transcript(thinker_server, pairs):
    since = len(thinker_server.requests)
    budget = Budget()
    reply = teacher(thinker_server, budget).propose(tasks_for(pairs, 1))[0]
    assert reply.error is None and reply.text is not None and reply.requests == 1
    rec = thinker_server.requests[since]
    assert rec["status"] == 200 and rec["images"] == 2 and rec["roles"] == ["user"]
    assert "Step back a little before you shoot" in rec["last_text"]
    assert "<Ratio>(1) Aspect Ratio: ...</Ratio>" in rec["last_text"]  # the format it must follow
    assert budget.requests == 1 and budget.tokens == reply.prompt_tokens + reply.completion_tokens > 0


@pytest.mark.parametrize("fault", ["429", "timeout", "malformed"])
def test_a_failed_request_is_retried_and_the_answer_still_comes_from_the_model(thinker_server, pairs, fault):
    since = len(thinker_server.requests)
    thinker_server.faults = [fault]
    t0 = time.perf_counter()
    # a short client timeout for the injected hang; still ample for the tiny VLM's answer
    reply = teacher(thinker_server, timeout_s=TIMEOUT_FAULT_CLIENT_S).propose(tasks_for(pairs, 1))[0]
    assert reply.error is None and reply.text and reply.requests == 2
    assert statuses(thinker_server, since) == [{"429": 429, "timeout": "timeout", "malformed": 200}[fault], 200]
    if fault == "timeout":
        assert time.perf_counter() - t0 >= TIMEOUT_FAULT_CLIENT_S  # it waited for the client timeout


def test_fault_by_header_and_giving_up_after_the_retries(thinker_server, pairs):
    since = len(thinker_server.requests)
    thinker_server.faults = ["503", "503", "503"]
    reply = teacher(thinker_server, max_retries=2).propose(tasks_for(pairs, 1))[0]
    assert reply.text is None and reply.requests == 3 and "gave up after 3 tries" in reply.error
    assert statuses(thinker_server, since) == [503, 503, 503]
    verdict = Validator().validate(tasks_for(pairs, 1), [reply])[0]
    assert not verdict.ok and verdict.reason == "teacher_error"
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = urllib.request.Request(thinker_server.base_url + "/chat/completions", data=body,
                                 headers={"Content-Type": "application/json", "X-Aesformer-Fault": "429"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 429 and e.value.headers["Retry-After"] == "0"


def test_a_reply_that_is_not_a_plan_goes_back_with_feedback_then_is_rejected(thinker_server, pairs, tmp_path):
    """The tiny VLM writes gibberish: each round fails to parse, the next round
    carries the rejected reply and the validator's feedback, and after
    max_rounds the pair is rejected; every attempt is in the cache."""
    since = len(thinker_server.requests)
    tasks = tasks_for(pairs, 2)
    with PlanCache(tmp_path / "cache.sqlite") as cache:
        result = feedback_loop(tasks, teacher(thinker_server), Validator(), cache, max_rounds=3)
        assert result.accepted == 0 and result.rejected == {"unparseable": 2} and result.attempts == 6
        assert result.rounds == {3: 2} and result.stopped is None
        for t in tasks:
            attempts = cache.attempts(t.key)
            assert [a["round"] for a in attempts] == [1, 2, 3]
            assert all(a["reason"] == "unparseable" and a["text"] is not None for a in attempts)
            out = cache.outcome(t.key)
            assert out["status"] == "rejected" and out["record"]["reason"] == "unparseable"
            assert out["record"]["rounds"] == 3
    recs = thinker_server.requests[since:]
    # round 1: the photos and the request; round 2 adds reply + feedback; round 3 once more
    assert [r["messages"] for r in recs] == [1, 1, 3, 3, 5, 5]
    assert recs[2]["roles"] == ["user", "assistant", "user"]
    assert "A reviewer rejected this plan" in recs[2]["last_text"] and "not a valid" in recs[2]["last_text"]


def test_the_spending_cap_stops_the_loop_and_keeps_what_finished(thinker_server, pairs, tmp_path):
    budget = Budget(max_requests=5)
    tasks = tasks_for(pairs, 3)
    with PlanCache(tmp_path / "cache.sqlite") as cache:
        result = feedback_loop(tasks, teacher(thinker_server, budget), Validator(), cache, max_rounds=2)
        assert result.stopped and "spending cap reached: 5 of 5 requests" in result.stopped
        # round 1: 3 requests; round 2: 2 more, the third pair's request is refused
        assert budget.requests == 5 and result.attempts == 5
        assert result.rejected == {"unparseable": 2} and result.open == 1
        assert [cache.outcome(t.key)["status"] if cache.outcome(t.key) else None for t in tasks] == \
            ["rejected", "rejected", None]
        assert len(cache.attempts(tasks[2].key)) == 1  # resumable from round 2


def test_openai_judge_reads_a_verdict_from_the_tiny_vlm(judge_server, pairs):
    """A measured plan passes the rules, then goes to the judge with both
    photos; the verdict is read from the first token's log-probs or the
    digit written, and decides the outcome against min_score."""
    since = len(judge_server.requests)
    tasks = tasks_for(pairs, 2)
    replies = MeasuredTeacher().propose(tasks)
    judge = Judge(client(judge_server))
    for min_score in (0.0, 1.01):
        verdicts = Validator(judge, min_score=min_score).validate(tasks, replies)
        for v in verdicts:
            assert v.checks["geometry"] == "agrees" and v.judge is not None and v.judge["requests"] == 1
            if v.judge["score"] is None:
                assert v.reason == "judge_unreadable" and not v.ok
            else:
                assert 0.0 <= v.judge["score"] <= 1.0 and v.judge["source"] in ("logprobs", "text")
                assert v.ok == (min_score == 0.0)
                assert v.reason == (None if min_score == 0.0 else "judge_rejected")
    recs = judge_server.requests[since:]
    assert len(recs) == 4 and all(r["images"] == 2 and r["status"] == 200 for r in recs)
    assert "How well does this plan describe the change" in recs[0]["last_text"]


def test_a_wrong_api_key_stops_instead_of_retrying(tiny_models, pairs):
    with FaultyChatServer(make_engine("hf", tiny_models["thinker"]), "locked", api_key="s3cret") as server:
        reply = teacher(server).propose(tasks_for(pairs, 1))[0]
        assert reply.stopped == "endpoint" and "HTTP 401" in reply.error and reply.requests == 1
        import os

        os.environ["AESF_TEST_KEY"] = "s3cret"
        try:
            ok = teacher(server, api_key_env="AESF_TEST_KEY").propose(tasks_for(pairs, 1))[0]
        finally:
            del os.environ["AESF_TEST_KEY"]
        assert ok.error is None and ok.text is not None

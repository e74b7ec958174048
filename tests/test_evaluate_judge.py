"""The evaluate job with an OpenAI-compatible judge that misbehaves (429,
500, truncated JSON, a reply with no verdict): it finishes, records every
failure, and a rerun asks nothing again. No Ray: the identity baseline
needs no model and the endpoint judge runs in the driver."""
from pathlib import Path

import pytest

from eval_pairs import write_eval_pairs
from misbehaving_judge import MisbehavingJudge

pytestmark = pytest.mark.timeout(600)


def _args(data, out, url, *extra):
    return [f"data={data}", f"output={out}", "systems=[identity]", "judge.kind=openai",
            f"judge.endpoint.base_url={url}", "judge.endpoint.model=judge-4o", "judge.endpoint.api_key_env=null",
            "judge.endpoint.max_retries=1", "judge.endpoint.backoff_s=0.01", "judge.endpoint.max_backoff_s=0.05",
            "judge.endpoint.concurrency=1", "judge.both_orders=1.0", "scorers=[{kind: 'classical:aesthetic'}]",
            "n_boot=200", *extra]


def test_a_misbehaving_judge_is_survived_every_failure_recorded_and_a_rerun_asks_nothing(tmp_path):
    from aesformer.evaluation.store import open_store
    from aesformer.jobs import evaluate

    data = write_eval_pairs(tmp_path / "data", n=3, side=48)
    out = tmp_path / "eval"
    # request 1: 429, its retry: 500 -> given up; request 3: truncated JSON, its retry: ok;
    # request 5: a reply with no verdict; everything after: {"winner": "A"}
    with MisbehavingJudge(["429", "500", "truncated", "ok", "no_verdict"], winner="A") as server:
        first = evaluate.main(_args(data, out, server.base_url))
        assert server.requests == 3 * 2 * 2 + 2  # 12 judgements (3 photos x poor/good x both orders) + 2 retries
        assert first["judge_asked"] == 12 and first["judge_requests"] == 14 and first["judge_failed"] == 2
        rows = open_store(out).verdicts()
        failed = [r for r in rows if r["outcome"] is None]
        assert len(rows) == 12 and len(failed) == 2
        failures = [f for r in rows for f in r["failures"]]
        assert any(f.startswith("HTTP 429") for f in failures) and any(f.startswith("HTTP 500") for f in failures)
        assert any(f.startswith("malformed reply") for f in failures)
        no_verdict = [r for r in failed if r["error"] == "no verdict in the reply"]
        assert len(no_verdict) == 1 and "rather not choose" in no_verdict[0]["raw"]
        assert any(r["error"].startswith("gave up after 2 tries") for r in failed)
        # the request settings the report names, as sent
        assert server.bodies[0]["model"] == "judge-4o" and server.bodies[0]["temperature"] == 0.0
        # a judge that always answers "A" is fully position-biased; the identity baseline
        # asked in both orders still scores 50% against the poor photo
        ident = first["summary"]["systems"]["identity"]
        assert ident["win_vs_poor"]["rate"] == pytest.approx(50.0)
        assert ident["position_bias"]["first_rate"] == 1.0
        md = Path(first["report"]).read_text()
        assert "model=judge-4o" in md and "judge failures" in md

        again = evaluate.main(_args(data, out, server.base_url))
        assert server.requests == 14  # nothing asked twice
        assert again["judge_requests"] == 0 and again["generated"] == 0 and again["scored"] == 0

"""The distillation job end to end on a local Ray: transcripts (subtitle
file, Whisper in an actor pool, unreachable video), the measured teacher,
the cache on rerun, the spending cap with a local judge pool and with the
openai teacher, and every output file."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from aesformer.actions import ActionPlan
from aesformer.data import ShardWriter, make_pair, read_pairs

pytestmark = pytest.mark.timeout(600)

COMMON = ["tracking.enabled=false", "profile=tiny"]


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    from aesformer.cluster import init_ray, shutdown_ray
    from aesformer.config import RayConfig

    init_ray(RayConfig(num_cpus=4, ship_code=False))
    yield
    shutdown_ray()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Six pairs from the sample photos under poor_framing: two from a video
    with subtitles, two from a copy of it without (speech recognition), two
    whose video is nowhere to be found."""
    from aesformer.samples import sample_photos
    from aesformer.synth import poor_framing
    from aesformer.videos import sample_set

    root = tmp_path_factory.mktemp("distill")
    videos = root / "videos"
    made = sample_set(videos, 1, seed=0, min_events=2, max_events=2, photo_size=200)
    truth = made["truths"][0]
    shutil.copy(videos / truth["file"], videos / "asr_only.mp4")
    rng = np.random.default_rng(11)
    photos = sample_photos()
    rows = []
    for k, (vid, event) in enumerate([(truth["video_id"], e) for e in truth["events"]]
                                     + [("asr_only", e) for e in truth["events"]]
                                     + [("missing", e) for e in truth["events"]]):
        _, photo = photos[k % len(photos)]
        good = photo.resize((160, round(160 * photo.height / photo.width)), Image.BICUBIC)
        poor, _ = poor_framing(good, rng)
        rows.append(make_pair(f"pair{k}", poor, good, video_id=vid, segment_start=event["start"],
                              segment_end=event["end"], split="train"))
    with ShardWriter(root / "pairs", shard_rows=4) as w:
        w.write_many(rows)
    return {"root": root, "pairs": root / "pairs", "videos": videos, "truth": truth}


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_measured_run_writes_plans_transcripts_and_exports_then_a_rerun_pays_nothing(dataset):
    from aesformer.jobs.distill import main

    out = dataset["root"] / "run_measured"
    args = [f"input={dataset['root']}", f"output={out}", f"transcript.videos={dataset['videos']}", "chunk_size=4",
            *COMMON]
    result = main(args)
    s = result["summary"]
    assert s["accepted"] == 6 and s["rejected"] == {} and s["pending"] == 0 and s["stopped"] is None
    assert s["rounds_used"] == {"1": 6} and s["requests"]["this_run"]["requests"] == 0
    assert s["transcripts"] == {"subtitle_file": 2, "asr": 2, "none": 2}
    assert s["transcript_missing"].get("video_not_found") == 2

    rows = {r["id"]: r for r in read_pairs(out / "pairs")}
    assert len(rows) == 6
    for r in rows.values():
        plan = ActionPlan.parse(r["plan"])
        assert plan.pose.startswith("Not measured")
        assert {"stage": "distill", "decision": "keep", "reason": "accepted in round 1 (teacher measured)"} \
            in r["decisions"]
    sub = [d for d in rows["pair0"]["decisions"] if d["stage"] == "transcript"][0]
    assert sub["decision"] == "subtitle_file"
    # the subtitle cue shown during the first event's poor framing
    assert dataset["truth"]["events"][0]["subtitle"] in rows["pair0"]["transcript"]
    assert [d["decision"] for d in rows["pair2"]["decisions"] if d["stage"] == "transcript"] == ["asr"]
    gone = [d for d in rows["pair4"]["decisions"] if d["stage"] == "transcript"][0]
    assert gone["decision"] == "none" and "'missing' not found" in gone["reason"]
    assert not rows["pair4"]["transcript"]

    assert len(_lines(out / "attempts.jsonl")) == 6 and _lines(out / "rejects.jsonl") == []
    sft = json.loads((out / "sft" / "aesrecon_sft.json").read_text())
    assert len(sft) == 6 and sft[0]["messages"][1]["content"].startswith("<Ratio>(1) Aspect Ratio:")
    assert (out / "sft" / sft[0]["images"][0]).is_file()

    again = main(args)["summary"]
    assert again["accepted"] == 6 and again["reused_from_cache"] == 6 and again["attempts_this_run"] == 0
    assert again["transcripts"] == s["transcripts"]
    assert len(read_pairs(out / "pairs")) == 6


def test_spending_cap_stops_the_job_with_every_finished_plan_written_then_resumes(dataset):
    """A local judge pool (the tiny judge, read from its digit log-probs)
    checks each measured plan; the cap of 3 requests stops the run cleanly
    after 3 pairs; the rerun without a cap does the other 3 only."""
    from aesformer.jobs.distill import main

    out = dataset["root"] / "run_capped"
    args = [f"input={dataset['pairs']}", f"output={out}", "transcript.enabled=false", "chunk_size=2",
            "validator.judge=local", "validator.min_score=0.0", *COMMON]
    s = main(args + ["budget.max_requests=3"])["summary"]
    assert "spending cap reached: 3 of 3 requests" in s["stopped"]
    assert s["accepted"] == 3 and s["pending"] == 3 and s["requests"]["this_run"]["by_role"] == {"judge": 3}
    rows = read_pairs(out / "pairs")
    assert len(rows) == 3 and all(ActionPlan.parse(r["plan"]) for r in rows)
    assert all(0.0 <= {x["name"]: x["value"] for x in r["scores"]}["distill_judge"] <= 1.0 for r in rows)
    assert json.loads((out / "sft" / "aesrecon_sft.json").read_text()).__len__() == 3

    s2 = main(args + ["budget.max_requests=0"])["summary"]
    assert s2["accepted"] == 6 and s2["pending"] == 0 and s2["stopped"] is None
    assert s2["reused_from_cache"] == 3 and s2["requests"]["this_run"]["requests"] == 3


def test_openai_teacher_job_rejects_gibberish_with_reasons_and_stops_at_the_cap(dataset, tiny_models):
    from aesformer.engines import make_engine
    from aesformer.jobs.distill import main
    from openai_faults import FaultyChatServer

    out = dataset["root"] / "run_openai"
    with FaultyChatServer(make_engine("hf", tiny_models["thinker"]), "tiny-thinker") as server:
        s = main([f"input={dataset['pairs']}", f"output={out}", "transcript.enabled=false", "chunk_size=2",
                  "teacher.kind=openai", f"teacher.openai.base_url={server.base_url}",
                  "teacher.openai.model=tiny-thinker", "teacher.openai.api_key_env=null",
                  "teacher.openai.timeout_s=60", "teacher.max_tokens=32", "validator.max_rounds=2",
                  "budget.max_requests=4", *COMMON])["summary"]
        assert all(r["images"] == 2 for r in server.requests) and len(server.requests) == 4
    assert s["rejected"] == {"unparseable": 2} and s["accepted"] == 0 and s["pending"] == 4
    assert "spending cap" in s["stopped"] and s["rounds_used"] == {"2": 2}
    rejects = _lines(out / "rejects.jsonl")
    assert [(r["status"], r["reason"], r["rounds"]) for r in rejects] == [("rejected", "unparseable", 2)] * 2
    assert all("not a valid seven-dimension plan" in r["feedback"] for r in rejects)
    attempts = _lines(out / "attempts.jsonl")
    assert sorted((a["pair_id"], a["round"]) for a in attempts) == [("pair0", 1), ("pair0", 2), ("pair1", 1),
                                                                     ("pair1", 2)]
    assert len(read_pairs(out / "rejects")) == 2 and read_pairs(out / "pairs") == []

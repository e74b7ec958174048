"""VCMP end to end on 12 synthetic tutorial videos (tiny profile).

One Ray session and one set of generated videos serve the whole module:
a clean run over the 12 videos, a rerun, and a run over six of the same
videos with broken files mixed in that is killed midway and resumed (pair
ids depend only on the video, so its pairs must equal the clean run's pairs
of those six videos).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aesformer.data import read_pairs, read_table
from aesformer.vcmp.report import evaluate, load_truths

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    from aesformer.cluster import init_ray, shutdown_ray
    from aesformer.config import RayConfig

    ray = init_ray(RayConfig(num_cpus=4, ship_code=False))
    yield ray
    shutdown_ray()


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    from aesformer.jobs.make_samples import main

    folder = tmp_path_factory.mktemp("samples")
    out = main([f"output={folder}", "videos=12", "tracking.enabled=false"])
    assert len(out["videos"]) == 12
    return folder


@pytest.fixture(scope="module")
def clean_run(samples, tmp_path_factory, tiny_models):
    from aesformer.jobs.vcmp import main

    out = tmp_path_factory.mktemp("vcmp_clean")
    return main([f"input={samples}", f"output={out}", "tracking.enabled=false"])


def _pairs(folder):
    rows = read_pairs(folder, columns=["id", "video_id", "poor_time", "good_time", "poor_image", "good_image",
                                       "split", "scores", "decisions"])
    return {r["id"]: r for r in rows}


def test_tiny_profile_recovers_90_percent_of_events_with_95_percent_precision(clean_run, samples):
    pairs = list(_pairs(clean_run["pairs_dir"]).values())
    ev = evaluate(pairs, load_truths(samples))
    assert ev["events"] >= 24  # 12 videos, 2-3 events each
    assert ev["recall"] >= 0.9, ev
    assert ev["false_rate"] <= 0.05, ev  # precision at least 0.95


def test_vlm_stages_run_and_every_pair_keeps_its_scores_and_decisions(clean_run):
    pairs = list(_pairs(clean_run["pairs_dir"]).values())
    assert pairs
    for p in pairs:
        scores = {s["name"]: s["value"] for s in p["scores"]}
        for name in ("poor_overlay", "good_frame_vlm", "iqa", "aesthetic", "sharp_vlm", "edit_attempts",
                     "edit_fidelity", "align_vlm", "orb_inliers", "overlap"):
            assert name in scores, (p["id"], name)
        assert 0.0 <= scores["good_frame_vlm"] <= 1.0 and 0.0 <= scores["align_vlm"] <= 1.0
        stages = [d["stage"] for d in p["decisions"]]
        assert stages[:4] == ["good_frame", "quality", "overlay", "align"]
        # the tiny editor paints noise: every attempt fails and the original poor frame is kept, on record
        edit = next(d for d in p["decisions"] if d["stage"] == "overlay_edit")
        assert edit["decision"] == "kept_original"
        assert len(json.loads(edit["reason"])) == 2  # both attempts logged
    f = clean_run["funnel"]
    # the cheap prefilters keep most frames away from the VLM
    assert 0.0 < f["vlm_fraction"] < 0.5


def test_every_sampled_frame_keeps_its_scores(clean_run):
    from aesformer.vcmp.rows import FRAME_SCHEMA

    frames = read_table(Path(clean_run["output"]) / "frames", schema=FRAME_SCHEMA).to_pylist()
    sampled = next(s["out"] for s in clean_run["funnel"]["stages"] if s["stage"] == "sample")
    assert len(frames) == sampled == len({f["id"] for f in frames})
    assert all(f["overlay"] is not None and f["sharpness"] is not None and f["reason"] for f in frames)
    # the VLM saw exactly the frames the prefilters let through
    assert all((f["vlm"] is not None) == f["plausible"] for f in frames)


def test_funnel_report_table_and_contact_sheet(clean_run):
    out = Path(clean_run["output"])
    f = json.loads((out / "funnel.json").read_text())
    stages = {s["stage"]: s for s in f["stages"]}
    assert list(stages) == ["ingest", "dedupe", "screen", "segment", "sample", "prefilter", "good_frame", "pairs",
                            "quality", "overlay", "align", "write"]
    assert stages["screen"]["in"] == stages["screen"]["out"] == 12
    assert stages["align"]["out"] == stages["write"]["out"] == clean_run["pairs"]
    for a, b in zip(f["stages"][4:], f["stages"][5:]):  # what leaves a stage enters the next
        assert a["out"] == b["in"], (a["stage"], b["stage"])
    assert stages["prefilter"]["reasons"]  # with reasons
    table = (out / "funnel.txt").read_text()
    assert "prefilter" in table and "→" in table
    assert (out / "contact_sheet.png").stat().st_size > 0
    splits = read_table(clean_run["pairs_dir"], columns=["split"]).column("split").to_pylist()
    assert set(splits) <= {"train", "test"} and "train" in splits


def test_rerun_skips_finished_videos(clean_run, samples):
    from aesformer.jobs.vcmp import main

    again = main([f"input={samples}", f"output={clean_run['output']}", "tracking.enabled=false"])
    assert again["new_videos"] == 0
    assert again["pairs"] == clean_run["pairs"]


# -- broken files, and a run killed midway -------------------------------------------------------

# every container and codec of the sample set, and a rotated video
SUBSET = ("tut0000", "tut0001", "tut0002", "tut0003", "tut0004", "tut0006")


@pytest.fixture(scope="module")
def broken_run(samples, tmp_path_factory, ray_session, clean_run):
    """Six of the videos plus four broken files; the first run is killed with
    SIGKILL once a video is recorded, then resumed in this process."""
    from aesformer.jobs.vcmp import main
    from aesformer.videos import broken_files

    folder = tmp_path_factory.mktemp("samples_broken")
    rows = [json.loads(x) for x in (samples / "manifest.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["video_id"] in SUBSET]
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for r in rows:
        for name in (r["file"], r["subtitles"]):
            if name:
                os.symlink(samples / name, folder / name)
    broken = broken_files(folder, samples / "tut0000.mp4")
    out = tmp_path_factory.mktemp("vcmp_broken")
    # one video at a time through each stage, each made durable as it finishes: the
    # first record appears while the later videos are still in the stream
    # (and a pool per model stage, as on a GPU cluster: the clean run had them in one actor)
    narrow = [f"pools.{p}.batch_size=1" for p in ("screen", "good_frame", "quality", "overlay", "align")]
    args = [f"input={folder}", f"output={out}", "tracking.enabled=false", "shard_rows=4", "checkpoint_s=0",
            "cpu_stage_tasks=1", "fuse_pair_stages=false", *narrow]
    address = ray_session.get_runtime_context().gcs_address
    log_path = tmp_path_factory.mktemp("vcmp_killed_log") / "driver.log"
    log_file = open(log_path, "w")
    env = dict(os.environ, RAY_AUTH_MODE="token")
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "vcmp.py"), *args, f"ray.address={address}",
                             "ray.ship_code=false"], cwd=REPO, env=env, stdout=log_file,
                            stderr=subprocess.STDOUT, start_new_session=True)
    state = out / "state" / "videos.jsonl"
    deadline = time.time() + 300
    at_kill = []
    try:
        while time.time() < deadline and proc.poll() is None:
            lines = [json.loads(x) for x in state.read_text().splitlines()] if state.exists() else []
            at_kill = [r for r in lines if r.get("status") != "rejected"]
            if at_kill:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        log_file.close()
    killed_midway = 0 < len(at_kill) < len(SUBSET)
    resumed = main(args)
    return {"broken": broken, "folder": folder, "killed_midway": killed_midway, "finished_before_kill": len(at_kill),
            "log": str(log_path), "resumed": resumed}


def test_broken_files_are_quarantined_and_change_no_pair(broken_run, clean_run):
    rejects = broken_run["resumed"]["rejects"]
    by_file = {Path(r["path"]).name: r for r in rejects}
    assert sorted(by_file) == sorted(broken_run["broken"])  # one row per broken file
    assert len(rejects) == 4
    assert by_file["broken_empty.mp4"]["reason"] == "empty file"
    assert all(r["reason"] and r["stage"] == "ingest" for r in rejects)
    table = Path(broken_run["resumed"]["output"]) / "rejects.parquet"
    assert table.exists()
    got = _pairs(broken_run["resumed"]["pairs_dir"])
    want = {k: v for k, v in _pairs(clean_run["pairs_dir"]).items() if v["video_id"] in SUBSET}
    assert want and sorted(got) == sorted(want)
    for pid, row in want.items():
        assert got[pid]["poor_image"] == row["poor_image"] and got[pid]["good_image"] == row["good_image"]


def test_killed_run_resumes_without_duplicates_or_lost_pairs(broken_run, clean_run):
    assert broken_run["killed_midway"], (broken_run["finished_before_kill"], broken_run["log"])
    res = broken_run["resumed"]
    assert 0 < res["new_videos"] < len(SUBSET)  # the finished videos were skipped
    ids = read_table(res["pairs_dir"], columns=["id", "video_id"]).to_pylist()
    want = [r for r in read_table(clean_run["pairs_dir"], columns=["id", "video_id"]).to_pylist()
            if r["video_id"] in SUBSET]
    assert len(ids) == len({r["id"] for r in ids}) == len(want)

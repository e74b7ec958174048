"""VCMP stages one by one, without Ray, on small synthetic inputs."""
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from aesformer.samples import sample_photo, sample_photos
from aesformer.synth import draw_overlays, fit, framing_pair
from aesformer.videos import VideoSpec, broken_files, tutorial_video


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A 2-event tutorial (mp4, 240x180, rotated 90 degrees, audio) and its truth."""
    folder = tmp_path_factory.mktemp("video")
    photos = [(n, im.resize((360, round(360 * im.height / im.width)))) for n, im in sample_photos(2)]
    spec = VideoSpec(ext="mp4", codec="h264", size=(240, 180), rotation=90, audio=True, srt=True)
    truth = tutorial_video(folder / "v.mp4", photos, np.random.default_rng(0), spec)
    return folder / "v.mp4", truth


# -- make_samples ---------------------------------------------------------------------

def test_sample_videos_are_deterministic_for_a_seed(tmp_path):
    photos = [(n, im.resize((200, round(200 * im.height / im.width)))) for n, im in sample_photos(1)]
    spec = VideoSpec(ext="mkv", codec="mpeg4", size=(160, 120))
    a = tutorial_video(tmp_path / "a.mkv", photos, np.random.default_rng(5), spec)
    b = tutorial_video(tmp_path / "b.mkv", photos, np.random.default_rng(5), spec)
    a.pop("file"), b.pop("file"), a.pop("video_id"), b.pop("video_id")
    assert a == b
    e = a["events"][0]
    assert e["start"] == e["poor"][0] < e["poor"][1] == e["transition"][0] < e["good"][0] < e["good"][1] == e["end"]
    assert 1.2 <= e["good"][1] - e["good"][0] <= 2.01
    assert {"zoom", "rotation_deg", "shift", "aspect_poor"} <= set(e["synth"])


# -- ingest --------------------------------------------------------------------------------

def test_probe_reads_rotation_and_quarantines_each_kind_of_broken_file(video, tmp_path):
    from aesformer.vcmp.ingest import ProbeError, probe

    path, truth = video
    info = probe(path)
    assert (info["width"], info["height"]) == (240, 180)  # display orientation
    assert info["rotation"] == 90 and info["has_audio"]
    assert abs(info["duration"] - truth["duration"]) < 0.2
    reasons = {}
    for name in broken_files(tmp_path, path):
        with pytest.raises(ProbeError) as err:
            probe(tmp_path / name)
        reasons[name] = err.value.reason
    assert reasons["broken_empty.mp4"] == "empty file"
    assert reasons["broken_text.mp4"] == "not a readable video container"
    assert reasons["broken_truncated.mp4"] in ("not a readable video container", "truncated or corrupt")
    assert reasons["broken_corrupt.mkv"]


def test_listing_uses_the_manifest_and_dedupe_names_what_repeats(tmp_path, video):
    from aesformer.vcmp.ingest import content_hash, dedupe, list_inputs

    path, _ = video
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / name).write_bytes(path.read_bytes())
    (tmp_path / "notes.json").write_text("{}")
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"video_id": "A", "title": "Framing tips", "file": "a.mp4"}) + "\n")
    entries, rejects = list_inputs(tmp_path)
    assert rejects == [] and [e.video_id for e in entries] == ["A", "b"]  # json ignored, stem as id
    assert entries[0].title == "Framing tips"
    rows = [{**e.to_dict(), "content_hash": content_hash(e.path)} for e in entries]
    kept, dup = dedupe(rows + [dict(rows[0], path="/elsewhere/a.mp4")])
    assert [k["video_id"] for k in kept] == ["A"]
    assert sorted(d["reason"] for d in dup) == ["duplicate content", "duplicate video id"]


def test_a_missing_listed_file_is_a_reject_not_an_error(tmp_path):
    from aesformer.vcmp.ingest import list_inputs

    (tmp_path / "list.txt").write_text("nowhere.mp4\nnotes.txt\n")
    (tmp_path / "notes.txt").write_text("x")
    entries, rejects = list_inputs(tmp_path / "list.txt")
    assert entries == [] and sorted(r["reason"] for r in rejects) == ["missing file", "unsupported file type"]


# -- segmentation and sampling ----------------------------------------------------------------

def test_segments_match_the_true_events(video):
    from aesformer.vcmp.segment import segment_video

    path, truth = video
    segs = segment_video(str(path), truth["duration"])
    for e in truth["events"]:
        assert any(abs(s["start"] - e["start"]) <= 0.2 and abs(s["end"] - e["end"]) <= 0.2 for s in segs), (e, segs)
    # narration before, between and after: 2 events + 3 narration segments
    assert len(segs) == 5


def test_sampling_takes_two_frames_a_second_upright_with_motion(video):
    from aesformer.vcmp.sample import sample_segment, sample_times

    assert sample_times(1.0, 3.0, 2.0) == [1.0, 1.5, 2.0, 2.5]
    path, truth = video
    e = truth["events"][0]
    frames = list(sample_segment(str(path), e["start"], e["end"], 2.0))
    assert len(frames) == len(sample_times(e["start"], e["end"], 2.0))
    t, arr, motion = frames[-1]
    assert arr.shape == (180, 240, 3)  # rotation metadata applied
    assert motion is not None and motion < 0.01  # the good photo is held still


# -- prefilters -------------------------------------------------------------------------------

def test_overlay_score_separates_tutorial_overlays_from_clean_photos():
    from aesformer.vcmp.prefilter import overlay_score

    rng = np.random.default_rng(0)
    for name, im in sample_photos():
        for size in ((160, 120), (320, 240)):
            good, _, _ = framing_pair(im, rng, good_fraction=0.7, good_aspect=4 / 3)
            clean = fit(good, size)
            assert overlay_score(np.asarray(clean)) < 0.65, name
            # the camera screen of a tutorial: subtitles, UI and grid together
            assert overlay_score(np.asarray(draw_overlays(clean, rng))) > 0.85, name
            # grid lines alone are enough
            assert overlay_score(np.asarray(draw_overlays(clean, rng, subtitles=False, ui=False))) > 0.75, name
    # subtitles over narration (a plain backdrop)
    backdrop = Image.new("RGB", (240, 180), (150, 120, 90))
    assert overlay_score(np.asarray(draw_overlays(backdrop, rng, ui=False, grid=False))) > 0.85


def test_plausible_needs_clean_sharp_and_still():
    from aesformer.vcmp.prefilter import plausible

    checks = [{"overlay": 0.99, "sharpness": 900.0, "motion": 0.05},  # poor frame under overlays
              {"overlay": 0.3, "sharpness": 20.0, "motion": 0.01},    # mid-blur
              {"overlay": 0.3, "sharpness": 400.0, "motion": 0.04},   # still moving
              {"overlay": 0.3, "sharpness": 420.0, "motion": 0.001}]  # held photo
    got = plausible(checks, overlay_max=0.75, min_sharpness=30, rel_sharpness=0.6, max_motion=0.02)
    assert [ok for ok, _ in got] == [False, False, False, True]
    assert [why.split(":")[0].split(" ")[0] for _, why in got[:3]] == ["overlay", "blurred", "unstable"]


def test_letterbox_trim():
    from aesformer.vcmp.prefilter import trim_letterbox

    arr = np.zeros((120, 160, 3), np.uint8)
    arr[:, 40:120] = 128
    assert trim_letterbox(arr) == (40, 0, 120, 120)


# -- pairs, split, transcript -------------------------------------------------------------------

def test_good_frames_are_paired_with_the_first_frame_best_first_and_spaced():
    from aesformer.vcmp.pairs import choose_good_frames, pair_id

    frames = [{"t": 0.0, "good": False}, {"t": 0.5, "good": True, "vlm": 0.9},
              {"t": 2.0, "good": True, "vlm": 0.6}, {"t": 2.5, "good": True, "vlm": 0.7},
              {"t": 3.5, "good": True, "vlm": 0.5}]
    chosen, skipped = choose_good_frames(frames, max_per_segment=2, min_gap_s=1.0, min_after_poor_s=1.0)
    assert chosen == [3, 4]  # 0.5 s is too soon after the poor frame; 2.0 is within 1 s of 2.5
    assert set(skipped) == {1, 2}
    assert choose_good_frames([{"t": 0, "good": True}, {"t": 2, "good": True}], 2, 1, 1)[0] == []
    assert pair_id("v1", 3, 12.5) == "v1-s003-t0012500"


def test_split_is_by_video_and_stable():
    from aesformer.vcmp.pairs import video_split

    splits = [video_split(f"vid{i}", 0.1) for i in range(2000)]
    assert 150 <= splits.count("test") <= 250
    assert video_split("vid7", 0.1) == splits[7]


def test_srt_transcript_of_a_segment(video, tmp_path):
    from aesformer.vcmp.pairs import read_srt, transcript

    path, truth = video
    cues = read_srt(str(path.with_suffix(".srt")))
    e = truth["events"][0]
    assert e["subtitle"] in transcript(cues, e["start"], e["end"])
    assert read_srt(str(tmp_path / "missing.srt")) == []


# -- geometry -----------------------------------------------------------------------------------

def test_orb_ransac_recovers_the_reframing_and_rejects_other_photos():
    from aesformer.vcmp.align import geometric_check, plausible_transform

    good, poor, truth = framing_pair(sample_photo("coffee"), np.random.default_rng(2), p_cut_off=0.0)
    g = geometric_check(np.asarray(poor), np.asarray(good))
    assert plausible_transform(g, 8, 0.2, 0.3)[0], g
    assert abs(g["rotation_deg"] - truth["rotation_deg"]) < 1.5
    assert abs(g["scale"] - np.hypot(*np.asarray(truth["matrix"])[:, 0])) < 0.05
    other = fit(sample_photo("chelsea"), good.size)
    bad = geometric_check(np.asarray(poor), np.asarray(other))
    assert not plausible_transform(bad, 8, 0.2, 0.3)[0]


# -- scorers and overlay verification -------------------------------------------------------------

def test_classical_scorers_prefer_the_sharp_clean_photo():
    from aesformer.vcmp.quality import load_scorer

    photo = fit(sample_photo("astronaut"), (256, 256))
    blurred = photo.filter(ImageFilter.GaussianBlur(4))
    noisy = Image.fromarray(np.clip(np.asarray(photo) + np.random.default_rng(0).normal(0, 40, (256, 256, 3)), 0, 255).astype(np.uint8))
    iqa = load_scorer("classical:iqa")([photo, blurred, noisy])
    assert iqa[0] > iqa[1] + 0.2 and iqa[0] > iqa[2]
    aes = load_scorer("classical:aesthetic")([photo, Image.new("RGB", (256, 256), (128, 128, 128))])
    assert aes[0] > aes[1] and all(0 <= a <= 1 for a in aes)


def test_a_torchscript_scorer_is_loaded_by_path(tmp_path):
    import torch

    from aesformer.vcmp.quality import load_scorer

    class Brightness(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(1, 2, 3)) * 9 + 1  # 1..10, like a LAION aesthetic score

    path = tmp_path / "bright.pt"
    torch.jit.save(torch.jit.script(Brightness()), str(path))
    (tmp_path / "bright.pt.json").write_text(json.dumps({"input_size": 32, "range": [1, 10]}))
    scores = load_scorer(str(path))([Image.new("RGB", (64, 48), (255, 255, 255)), Image.new("RGB", (64, 48), 0)])
    assert np.allclose(scores, [1.0, 0.0], atol=1e-4)
    with pytest.raises(FileNotFoundError, match="quality.iqa"):
        load_scorer(str(tmp_path / "nope.pt"), config_key="quality.iqa")


def test_an_edit_passes_only_when_clean_and_faithful():
    from aesformer.vcmp.overlays import verify_edit

    clean = fit(sample_photo("rocket"), (240, 180))
    poor = draw_overlays(clean, np.random.default_rng(0))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (180, 240, 3), dtype=np.uint8))
    ok = verify_edit(poor, clean, judge_p=0.9, judge_threshold=0.5, detector_max=0.5, fidelity_min=0.5)
    assert ok["passed"], ok
    assert not verify_edit(poor, poor, 0.9, 0.5, 0.5, 0.5)["passed"]  # overlays left
    bad = verify_edit(poor, noise, 0.9, 0.5, 0.5, 0.5)
    assert not bad["passed"] and "fidelity" in bad["reason"]
    assert not verify_edit(poor, clean, 0.2, 0.5, 0.5, 0.5)["passed"]  # the judge says no


# -- screening, state, report ------------------------------------------------------------------------

def test_manifest_rules():
    from aesformer.vcmp.screen import manifest_rules

    words = ["sponsored", "showcase"]
    assert manifest_rules("Sponsored: camera sale", "", words) == "manifest: 'sponsored' in title/source"
    assert manifest_rules("Portrait framing tips", "youtube", words) is None
    assert manifest_rules("Tips", "tiktok", words, ["youtube"]) == "manifest: source 'tiktok' not allowed"


def test_state_keeps_one_reject_per_file_and_the_latest_record(tmp_path):
    from aesformer.vcmp.state import RunState

    s = RunState(tmp_path)
    r = {"video_id": "x", "path": "/x.mp4", "stage": "ingest", "reason": "empty file", "detail": ""}
    s.append([{"status": "rejected", "video_id": "x", "path": "/x.mp4", "reject": r}] * 2)
    s.append([{"status": "done", "video_id": "v", "path": "/v.mp4", "pairs": ["a"]}])
    with open(s.path, "a") as f:
        f.write('{"status": "done", "video_id": "torn')  # a crash mid-line
    assert s.rejects() == [r]
    assert list(s.finished()) == ["v"]


def test_evaluate_counts_recovered_events_and_false_pairs():
    from aesformer.vcmp.report import evaluate

    truths = {"v": {"events": [{"index": 0, "poor": [1, 3], "good": [4, 5]},
                               {"index": 1, "poor": [8, 10], "good": [11, 12]}]}}
    pairs = [{"id": "a", "video_id": "v", "poor_time": 1.0, "good_time": 4.5},
             {"id": "b", "video_id": "v", "poor_time": 1.0, "good_time": 11.5}]
    ev = evaluate(pairs, truths)
    assert (ev["recovered"], ev["recall"], ev["false_pairs"], ev["missed"]) == (1, 0.5, 1, [("v", 1)])


def test_a_stage_failure_marks_the_row_and_spares_the_others():
    from aesformer.actors.vcmp_actors import guarded
    from aesformer.vcmp import rows as R

    rows = [R.new_row({"video_id": v, "path": f"/{v}.mp4"}, {"pairs": [{"id": f"{v}-p", "dropped": None}]})
            for v in ("ok", "bad")]

    def stage(batch):
        if any(r["video_id"] == "bad" for r in batch):
            raise ValueError("decoder exploded")
        return batch

    out = {r["video_id"]: R.info(r) for r in guarded("align", rows, stage)}
    assert "error" not in out["ok"] and out["ok"]["pairs"][0]["dropped"] is None
    assert out["bad"]["error"]["stage"] == "align"
    assert out["bad"]["pairs"][0]["dropped"] == "align"
    assert "decoder exploded" in out["bad"]["pairs"][0]["reason"]


# -- a pair must show an improvement; blurred and captioned stills are not results ------------------

def _tutorial_views():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import tutorial_videos as TV

    src = TV.photo("china")
    good, poor, _ = TV.views(src, np.random.default_rng(3))
    return TV, TV.fill(good, (320, 180)), TV.fill(poor, (320, 180))


def test_view_change_tells_the_same_picture_from_a_reframing():
    import io

    from aesformer.vcmp.align import view_change

    TV, good, poor = _tutorial_views()
    rng = np.random.default_rng(0)
    noisy = np.clip(poor + rng.normal(0, 8, poor.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(poor).save(buf, format="JPEG", quality=30)
    compressed = np.asarray(Image.open(buf).convert("RGB"))
    captioned = TV.overlay(poor, "boxed", "Now look at the result")
    held = TV.jitter(poor, 2.5, -2.0, 0.6)  # a hand's jitter
    for name, frame in {"identical": poor, "noise": noisy, "compression": compressed, "caption": captioned,
                        "jitter": held}.items():
        v = view_change(poor, frame)
        assert v["same"], (name, v)
        assert v["reason"].startswith("no improvement"), v
    moved = view_change(poor, good)
    assert not moved["same"], moved
    # a heavily blurred still whose caption changes: too few features, and the thumbnails agree
    a = TV.still(TV.photo("flower"), (320, 180), "Here is the trick I use", True, "outline")
    b = TV.still(TV.photo("flower"), (320, 180), "See you in the next lesson", True, "outline")
    v = view_change(a, b)
    assert v["same"], v


def test_detail_sees_through_captions_and_plausible_rejects_blurred_results():
    from aesformer.vcmp.prefilter import detail, frame_checks, plausible, sharpness

    TV, good, poor = _tutorial_views()
    blurred = TV.still(TV.photo("china"), (320, 180), "Here is the trick I use", True, "box")
    # the caption gives the blurred still edges (sharpness) but no detail
    assert sharpness(blurred) > 30 and detail(blurred) < 60 < detail(good)
    soft = np.asarray(Image.fromarray(good).filter(ImageFilter.GaussianBlur(3)))
    checks = [frame_checks(TV.overlay(poor, "ticker", "Closer"), 0.03), frame_checks(good, 0.0),
              frame_checks(blurred, 0.0), frame_checks(soft, 0.0)]
    got = plausible(checks, overlay_max=0.75, min_sharpness=30, rel_sharpness=0.6, max_motion=0.005,
                    min_detail=60, rel_detail=0.025)
    assert got[1] == (True, "plausible")
    assert got[2][1].startswith("captioned still"), got[2]
    assert not got[3][0] and got[3][1].startswith("blurred"), got[3]


def test_a_frame_showing_the_poor_view_gives_no_pair():
    from aesformer.vcmp.pairs import choose_good_frames

    same = {"reason": "no improvement: the poor frame's view (40 features match, scale 1.00, tilt 0.1 deg)"}
    frames = [{"t": 0.0, "good": False}, {"t": 1.5, "good": True, "vlm": 0.9, "same_view": True, "view": same},
              {"t": 3.0, "good": True, "vlm": 0.6, "same_view": False, "view": {"reason": "view changed"}}]
    chosen, skipped = choose_good_frames(frames, max_per_segment=2, min_gap_s=1.0, min_after_poor_s=1.0)
    assert chosen == [2]
    assert skipped == {1: same["reason"]}


def test_a_cut_from_the_poor_view_to_the_result_stays_one_segment(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import tutorial_videos as TV

    from aesformer.vcmp.segment import segment_video

    truth = TV.tutorial(tmp_path / "cut.mp4", ["china"], np.random.default_rng(1), 2)
    e = truth["events"][0]
    assert e["transition_kind"] == "cut"
    segs = segment_video(str(tmp_path / "cut.mp4"), truth["duration"])
    assert any(abs(s["start"] - e["start"]) <= 0.1 and s["end"] >= e["good"][1] - 0.1 for s in segs), (e, segs)


@pytest.mark.timeout(600)
def test_fused_pair_stages_decide_like_separate_ones(video, tiny_models):
    """MinePairs (stages good_frame to align in one actor, one judge) gives
    the rows the four stage callables give one after another."""
    from aesformer.actors.vcmp_actors import (CheckAlignment, FilterGoodImages, JudgeGoodFrames, MinePairs,
                                              RemoveOverlays)
    from aesformer.jobs.vcmp import VcmpConfig
    from aesformer.config import load_config
    from aesformer.vcmp import rows as R
    from aesformer.vcmp.flow import sample_stage, segment_stage
    from aesformer.vcmp.ingest import probe

    path, truth = video
    cfg = load_config(VcmpConfig, "vcmp", ["input=x"])
    row = R.new_row({"video_id": "v", "path": str(path)}, {"probe": probe(path), "screen": {"keep": True}})
    segs = [sample_stage(s, cfg.sample, cfg.prefilter, cfg.improvement) for s in segment_stage(row, cfg.segment)]
    table = R.table(segs)
    common = dict(judge=tiny_models["judge"], engine="hf", max_pixels=cfg.judge_max_pixels, batch_size=8)
    fused = MinePairs(editor=tiny_models["editor"], good=cfg.good_frame, quality=cfg.quality,
                      overlay=cfg.overlay, align=cfg.align, **common)
    got = [R.info(r) for r in R.rows_of(fused(table))]
    want = table
    for stage in (JudgeGoodFrames(good=cfg.good_frame, **common), FilterGoodImages(quality=cfg.quality, **common),
                  RemoveOverlays(editor=tiny_models["editor"], overlay=cfg.overlay, **common),
                  CheckAlignment(align=cfg.align, **common)):
        want = stage(want)
    want = [R.info(r) for r in R.rows_of(want)]
    decided = lambda infos: [[(p["id"], p["dropped"], [d["stage"] for d in p["decisions"]]) for p in i.get("pairs", [])]
                             for i in infos]
    assert decided(got) == decided(want)
    assert any(i.get("pairs") for i in got)


def test_decode_task_gives_the_rows_of_segmentation_then_sampling(video):
    """One CPU task per video (stages 3 to 5a) gives the rows the two stage
    functions give one after the other."""
    from aesformer.actors.vcmp_actors import decode_batch
    from aesformer.config import load_config
    from aesformer.jobs.vcmp import VcmpConfig
    from aesformer.vcmp import rows as R
    from aesformer.vcmp.flow import sample_stage, segment_stage
    from aesformer.vcmp.ingest import probe

    path, _ = video
    cfg = load_config(VcmpConfig, "vcmp", ["input=x"])
    row = R.new_row({"video_id": "v", "path": str(path)}, {"probe": probe(path), "screen": {"keep": True}})
    want = [sample_stage(s, cfg.sample, cfg.prefilter, cfg.improvement) for s in segment_stage(row, cfg.segment)]
    got = R.rows_of(decode_batch(R.table([row]), cfg.segment, cfg.sample, cfg.prefilter, cfg.improvement,
                                 niceness=None))
    assert len(got) == len(want) >= 2
    assert [R.info(r) for r in got] == [R.info(r) for r in want]


def _niceness_from(start, asked, queue):
    import os

    from aesformer.actors.vcmp_actors import _lower_priority

    os.setpriority(os.PRIO_PROCESS, 0, start)
    _lower_priority(asked)
    queue.put(os.getpriority(os.PRIO_PROCESS, 0))


@pytest.mark.parametrize("start,asked,expected", [(0, 19, 19), (0, None, 0), (19, 10, 19)])
def test_decode_tasks_lower_their_priority_and_never_raise_it(start, asked, expected):
    """A decoding worker goes to the configured niceness (Ray starts workers
    at 15, the decode tasks ask for 19), and is never made more urgent."""
    import multiprocessing
    import os

    if os.getpriority(os.PRIO_PROCESS, 0) > start:
        pytest.skip("this process already runs at a lower priority than the case starts from")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_niceness_from, args=(start, asked, queue))
    proc.start()
    proc.join(30)
    assert queue.get(timeout=5) == expected

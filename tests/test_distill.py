"""Action distillation, library parts: the measured teacher against synth
truth, the validator's rules, the cache and the transcripts. No Ray here
(see test_distill_job.py for the job)."""
from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from aesformer.actions import ActionPlan
from aesformer.distill.cache import PlanCache, plan_key
from aesformer.distill.chat import Reply
from aesformer.distill.measured import (ROTATION_TOL, SHIFT_TOL, ZOOM_TOL, ASPECT_TOL, directions, measure_pair,
                                        plan_from_measurement, ratio_name)
from aesformer.distill.teachers import MeasuredTeacher, PairTask
from aesformer.distill.transcript import (Cue, embedded_subtitles, parse_subtitles, segment_text, text_transcript,
                                          VideoLocator)
from aesformer.distill.validator import Validator, geometry_conflicts, plan_claims
from aesformer.samples import sample_photos
from aesformer.synth import framing_pair, poor_framing

AXES = ("aspect", "zoom", "rotation", "move_x", "move_y")
# a truth this close to a "keep" threshold may honestly read either way
TOLERANCES = {"aspect": ASPECT_TOL, "zoom": ZOOM_TOL, "rotation": ROTATION_TOL, "move_x": SHIFT_TOL,
              "move_y": SHIFT_TOL}


def _truth_size(truth: dict, axis: str) -> float:
    return {"aspect": abs(truth["aspect_good"] / truth["aspect_poor"] - 1), "zoom": abs(truth["zoom"] - 1),
            "rotation": abs(truth["rotation_deg"]), "move_x": abs(truth["shift"][0]),
            "move_y": abs(truth["shift"][1])}[axis]


def _agrees(axis: str, truth: dict, said: str | None) -> bool:
    want = directions(truth)[axis]
    if said == want:
        return True
    near = abs(_truth_size(truth, axis) - TOLERANCES[axis]) < 0.5 * TOLERANCES[axis]
    return near and said in ("keep", want)


@pytest.fixture(scope="module")
def synth_pairs():
    """24 (poor, good, truth): the six sample photos under poor_framing, fixed seed."""
    rng = np.random.default_rng(2024)
    out = []
    for _ in range(4):
        for name, photo in sample_photos():
            photo = photo.resize((photo.width * 2 // 3, photo.height * 2 // 3), Image.BICUBIC)
            poor, truth = poor_framing(photo, rng)
            out.append((poor, photo, truth))
    return out


@pytest.fixture(scope="module")
def measured(synth_pairs):
    return [measure_pair(p, g) for p, g, _ in synth_pairs]


def test_measured_plan_names_the_right_direction_in_at_least_90_percent_of_pairs(synth_pairs, measured):
    """Aspect ratio, zoom/crop, rotation and subject shift: the plan's own
    phrases (read back by the validator's parser) and the structured
    measurement both point the way the truth says, in >= 90% of 24 pairs."""
    right_text = right_numbers = 0
    for (poor, good, truth), m in zip(synth_pairs, measured):
        plan = plan_from_measurement(m)
        said = plan_claims(plan)
        # "keep" is written as "Keep …", which the claim parser does not count as a direction
        for axis in AXES:
            if said[axis] is None and directions(m)[axis] == "keep":
                said[axis] = "keep"
        right_text += all(_agrees(a, truth, said[a]) for a in AXES)
        right_numbers += all(_agrees(a, truth, directions(m)[a]) for a in AXES)
    assert len(synth_pairs) >= 20
    assert right_text / len(synth_pairs) >= 0.9, right_text
    assert right_numbers / len(synth_pairs) >= 0.9, right_numbers


def test_measurement_matches_the_synth_numbers(synth_pairs, measured):
    """Median errors: zoom within 2%, rotation within 0.5°, shift within 2% of the frame."""
    zoom_err = [abs(m["zoom"] / t["zoom"] - 1) for (_, _, t), m in zip(synth_pairs, measured) if m["geometry_ok"]]
    rot_err = [abs(m["rotation_deg"] - t["rotation_deg"]) for (_, _, t), m in zip(synth_pairs, measured)
               if m["geometry_ok"]]
    shift_err = [max(abs(m["shift"][0] - t["shift"][0]), abs(m["shift"][1] - t["shift"][1]))
                 for (_, _, t), m in zip(synth_pairs, measured) if m["geometry_ok"]]
    assert len(zoom_err) >= 0.9 * len(measured)
    assert np.median(zoom_err) < 0.02 and np.median(rot_err) < 0.5 and np.median(shift_err) < 0.02


def test_plan_text_carries_checkable_phrases():
    m = {"aspect_poor": 4 / 3, "aspect_good": 16 / 9, "geometry_ok": True, "zoom": 1.3, "rotation_deg": 4.0,
         "shift": [0.12, 0.0], "overlap": 1.0, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0,
         "temperature": 0.0, "tint": 0.0, "sharpness": 0.0}
    plan = plan_from_measurement(m)
    assert "Widen the aspect ratio from 4:3 to 16:9" in plan.ratio
    assert "Crop tighter (zoom in 1.30x)" in plan.composition
    assert "Rotate 4.0° clockwise to level the horizon" in plan.camera
    assert "Move the subject left by 12% of the width" in plan.position
    assert plan.pose.startswith("Not measured")
    assert ActionPlan.parse(plan.render()) == plan
    assert ratio_name(0.75) == "3:4" and ratio_name(1.42) == "1.42:1"


def test_the_transform_of_the_sample_videos_is_measured_too():
    """framing_pair (what the sample videos use): the good image is a crop of
    the photo, the poor view is rendered from the whole photo."""
    rng = np.random.default_rng(5)
    ok = 0
    for name, photo in sample_photos(4):
        good, poor, truth = framing_pair(photo, rng, good_fraction=0.7)
        m = measure_pair(poor, good)
        ok += all(_agrees(a, truth, directions(m)[a]) for a in AXES)
    assert ok >= 3


def test_colour_and_light_changes_are_measured():
    _, photo = sample_photos(2)[1]
    poor = photo
    good = ImageEnhance.Brightness(photo).enhance(1.3)
    r, g, b = good.split()
    good = Image.merge("RGB", (r.point(lambda v: min(255, int(v * 1.08))), g, b.point(lambda v: int(v * 0.85))))
    m = measure_pair(poor, good)
    assert m["geometry_ok"] and abs(m["zoom"] - 1) < 0.02
    assert m["brightness"] > 0.15 and m["temperature"] > 2.0
    color = plan_from_measurement(m).color
    assert "brighten the exposure" in color.lower() and "warm the colour temperature" in color


def test_unrelated_images_say_plainly_that_geometry_was_not_measured():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))
    flat = Image.new("RGB", (300, 200), (120, 130, 140))
    m = measure_pair(noise, flat)
    assert not m["geometry_ok"] and "too few matching features" in m["geometry_reason"]
    plan = plan_from_measurement(m)
    for text in (plan.composition, plan.camera, plan.position):
        assert "not measured" in text.lower()
    assert MeasuredTeacher().propose([PairTask("k", "p", noise, flat)])[0].text == plan.render()


# -- validator ---------------------------------------------------------------------------

def _task(pair, m):
    poor, good, truth = pair
    return PairTask("k", "p", poor, good, "", m)


def test_a_plan_that_crops_tighter_when_the_good_image_is_wider_fails_with_the_reason(synth_pairs, measured):
    i = next(i for i, m in enumerate(measured) if m["geometry_ok"] and m["zoom"] < 0.9)
    m = measured[i]
    good_plan = plan_from_measurement(m)
    assert "Widen the framing (zoom out" in good_plan.composition
    wrong = good_plan.replace(composition="Crop tighter (zoom in 1.2x) to fill the frame with the subject.")
    v = Validator()
    ok, bad = v.validate([_task(synth_pairs[i], m)] * 2, [Reply(text=good_plan.render()), Reply(text=wrong.render())])
    assert ok.ok and ok.reason is None and ok.plan == good_plan.render()
    assert not bad.ok and bad.reason == "geometry_conflict"
    assert "crop tighter" in bad.feedback and "wider view" in bad.feedback


def test_rotation_and_subject_direction_conflicts_are_caught():
    m = {"aspect_poor": 1.5, "aspect_good": 1.5, "geometry_ok": True, "zoom": 1.0, "rotation_deg": 6.0,
         "shift": [-0.15, 0.0]}
    plan = ActionPlan(ratio="Keep 3:2.", composition="Keep the framing.",
                      camera="Rotate 6 degrees counter-clockwise to level the horizon.",
                      position="Move the subject left by 15% of the width.", pose="Keep.", focus="Keep.",
                      color="Keep.")
    conflicts = geometry_conflicts(plan, m)
    assert len(conflicts) == 2
    assert "must turn clockwise" in conflicts[0] and "sits right" in conflicts[1]


@pytest.mark.parametrize("text,reason", [
    ("Make it nicer please.", "unparseable"),
    ("<Ratio>(1) Aspect Ratio: keep</Ratio>", "unparseable"),
    (ActionPlan(ratio="Keep.", composition="Keep.", camera="Keep.", position="Keep.", pose="",
                focus="Keep.", color="Keep.").render(), "incomplete"),
])
def test_rules_reject_what_is_not_a_complete_plan(text, reason):
    v = Validator().check_rules(PairTask("k", "p", None, None), text)
    assert not v.ok and v.reason == reason and v.feedback


def test_text_around_the_plan_is_tolerated_unless_strict():
    plan = ActionPlan(*(["Keep."] * 7)).render()
    assert Validator().check_rules(PairTask("k", "p", None, None), "Sure! Here it is:\n" + plan).ok
    strict = Validator(strict_format=True).check_rules(PairTask("k", "p", None, None), "Sure!\n" + plan)
    assert not strict.ok and strict.reason == "unparseable"


# -- cache ---------------------------------------------------------------------------------

def test_cache_survives_reopening_and_keys_depend_on_content_and_settings(tmp_path):
    k1 = plan_key(b"poor", b"good", "hi", {"teacher": "a"})
    assert k1 == plan_key(b"poor", b"good", "hi", {"teacher": "a"})
    assert k1 != plan_key(b"poor", b"good", "hi", {"teacher": "b"})
    assert k1 != plan_key(b"poor", b"good2", "hi", {"teacher": "a"})
    with PlanCache(tmp_path / "c.sqlite") as c:
        c.add_attempt(k1, "p1", 1, {"round": 1, "text": "x", "ok": False, "feedback": "no"})
        c.add_attempt(k1, "p1", 2, {"round": 2, "text": "y", "ok": True})
        c.finish(k1, "p1", "accepted", {"plan": "y", "rounds": 2})
    with PlanCache(tmp_path / "c.sqlite") as c:
        assert c.outcome(k1) == {"status": "accepted", "record": {"plan": "y", "rounds": 2}}
        assert [a["round"] for a in c.attempts(k1)] == [1, 2]
        c.restart(k1)
        assert c.outcome(k1) is None and c.attempts(k1) == []
        assert len(list(c.all_attempts())) == 2  # still on record
    # the file is a plain SQLite database in WAL mode
    assert sqlite3.connect(tmp_path / "c.sqlite").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- transcripts ----------------------------------------------------------------------------

SRT = """1
00:00:00,000 --> 00:00:02,000
<i>Hello</i> everyone

2
00:00:02,000 --> 00:00:04,500
Step back a little

3
00:00:06,000 --> 00:00:08,000
{\\an8}Now shoot
"""


def test_subtitles_parse_and_the_segment_takes_overlapping_cues():
    cues = parse_subtitles(SRT)
    assert [(c.start, c.end, c.text) for c in cues] == [(0.0, 2.0, "Hello everyone"), (2.0, 4.5, "Step back a little"),
                                                       (6.0, 8.0, "Now shoot")]
    assert segment_text(cues, 1.0, 5.0) == "Hello everyone Step back a little"
    vtt = "WEBVTT\n\n00:01.000 --> 00:02.500\nHi there\n"
    assert parse_subtitles(vtt) == [Cue(1.0, 2.5, "Hi there")]


def test_subtitle_track_inside_the_video_is_read(tmp_path):
    import av

    (tmp_path / "t.srt").write_text(SRT)
    src = av.open(str(tmp_path / "t.srt"))
    path = tmp_path / "with_subs.mkv"
    out = av.open(str(path), "w")
    v = out.add_stream("mpeg4", rate=10)
    v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
    s = out.add_stream_from_template(src.streams.subtitles[0])
    for _ in range(20):
        for p in v.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")):
            out.mux(p)
    for p in v.encode():
        out.mux(p)
    for pkt in src.demux(src.streams.subtitles[0]):
        if pkt.dts is not None:
            pkt.stream = s
            out.mux(pkt)
    out.close()
    src.close()
    cues = embedded_subtitles(path)
    assert segment_text(cues, 2.5, 7.0) == "Step back a little Now shoot"
    loc = VideoLocator([str(path)])
    r = text_transcript({"video_id": "with_subs", "segment_start": 2.5, "segment_end": 7.0}, loc)
    assert r == {"text": "Step back a little Now shoot", "source": "subtitle_track", "reason": None}


def test_an_unreachable_video_leaves_the_transcript_empty_with_a_reason(tmp_path):
    r = text_transcript({"video_id": "gone", "segment_start": 0.0, "segment_end": 2.0}, VideoLocator([str(tmp_path)]))
    assert r["text"] == "" and r["code"] == "video_not_found" and "gone" in r["reason"]
    r = text_transcript({"video_id": "x"}, VideoLocator())
    assert r["code"] == "no_segment_times"


def test_missing_input_is_a_config_error_naming_the_key(tmp_path, capsys):
    from aesformer.jobs.distill import main

    with pytest.raises(SystemExit) as e:
        main([f"output={tmp_path / 'out'}", "tracking.enabled=false"])
    assert e.value.code == 2
    assert "input=<AesRecon dataset folder>" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([f"output={tmp_path / 'out'}", f"input={tmp_path / 'nothing'}", "tracking.enabled=false"])
    assert "does not exist" in capsys.readouterr().err


def test_judge_scores_read_from_digit_logprobs_or_the_written_digit():
    from aesformer.distill.validator import score_from_logprobs, score_from_text

    assert score_from_logprobs({str(d): 0.0 for d in range(6)}) == pytest.approx(0.5)
    assert score_from_logprobs({"5": 0.0, "0": -100.0, "cat": 3.0}) == pytest.approx(1.0)
    assert score_from_logprobs({" 4": -0.1}) == pytest.approx(0.8)
    assert score_from_logprobs({"cat": 0.0}) is None
    assert score_from_text("4") == pytest.approx(0.8) and score_from_text("Score: 3/5") == pytest.approx(0.6)
    assert score_from_text("about 2.5 maybe") is None and score_from_text("gibberish") is None

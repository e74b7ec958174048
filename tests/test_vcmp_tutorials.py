"""VCMP end to end on tutorials made another way than the sample generator
(tests/tutorial_videos.py: other photographs and overlays, narration over
blurred and static captioned stills, pillarboxed and letterboxed results,
handheld jitter, fades, dissolves and straight cuts), tiny profile.

Each mined pair is matched to the ground-truth frames: it is right when its
poor frame is a poor-view frame and its good frame a result frame of the
same event.
"""
import sys
from pathlib import Path

import pytest

from aesformer.data import read_pairs

sys.path.insert(0, str(Path(__file__).parent))
import tutorial_videos as TV  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    from aesformer.cluster import init_ray, shutdown_ray
    from aesformer.config import RayConfig

    ray = init_ray(RayConfig(num_cpus=4, ship_code=False))
    yield ray
    shutdown_ray()


@pytest.fixture(scope="module")
def tutorials(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tutorials")
    truths = TV.make_set(folder, videos=6)
    assert sum(len(t["events"]) for t in truths) == 15
    return folder


@pytest.fixture(scope="module")
def run(tutorials, tmp_path_factory, tiny_models):
    from aesformer.jobs.vcmp import main

    out = tmp_path_factory.mktemp("vcmp_tutorials")
    return main([f"input={tutorials}", f"output={out}", "tracking.enabled=false"])


@pytest.mark.timeout(900)
def test_events_are_found_and_pairs_are_right_on_other_tutorials(run, tutorials):
    pairs = read_pairs(run["pairs_dir"], columns=["id", "video_id", "poor_time", "good_time"])
    s = TV.score(pairs, TV.truths_of(tutorials))
    assert s["events"] == 15
    assert s["recall"] >= 0.9, s
    assert s["precision"] >= 0.95, s


@pytest.mark.timeout(900)
def test_stills_and_unchanged_views_are_dropped_with_their_reasons(run):
    stages = {s["stage"]: s for s in run["funnel"]["stages"]}
    prefilter, pairs = " ".join(stages["prefilter"]["reasons"]), stages["pairs"]["reasons"]
    # the narration B-roll: blurred stills under captions are not results
    assert "captioned still" in prefilter
    # static stills whose caption changes, held results: the poor frame's own view is no improvement
    assert any(k.startswith("no improvement") for k in pairs), pairs
    # what was dropped is counted: frames in, pairs and reasons out
    assert stages["pairs"]["in"] == stages["pairs"]["out"] + sum(pairs.values())

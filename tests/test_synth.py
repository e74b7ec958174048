"""aesformer.synth: synthetic poor framings whose truth matches the pixels."""
import math

import numpy as np
from PIL import Image, ImageDraw

from aesformer.samples import sample_photo
from aesformer.synth import draw_overlays, framing_pair, poor_framing

KEYS = {"aspect_good", "aspect_poor", "zoom", "rotation_deg", "shift", "subject_cut_off", "flaws", "matrix"}


def _marker_photo(w=240, h=160):
    """Grey photo with a red dot at the centre and a black horizontal bar."""
    im = Image.new("RGB", (w, h), (128, 128, 128))
    d = ImageDraw.Draw(im)
    d.ellipse([w / 2 - 5, h / 2 - 5, w / 2 + 5, h / 2 + 5], fill=(255, 0, 0))
    d.rectangle([w * 0.1, h * 0.25 - 2, w * 0.9, h * 0.25 + 2], fill=(0, 0, 0))
    return im


def test_same_seed_same_poor_frame_and_truth():
    photo = sample_photo("chelsea")
    a, ta = poor_framing(photo, np.random.default_rng(7))
    b, tb = poor_framing(photo, np.random.default_rng(7))
    assert ta == tb and np.array_equal(np.asarray(a), np.asarray(b))
    c, tc = poor_framing(photo, np.random.default_rng(8))
    assert tc != ta


def test_truth_has_the_shared_keys_and_sane_ranges():
    for seed in range(20):
        poor, t = poor_framing(sample_photo("coffee"), np.random.default_rng(seed))
        assert KEYS <= set(t)
        assert poor.size == tuple(t["poor_size"])
        assert abs(t["aspect_poor"] - poor.width / poor.height) < 1e-6
        assert 2.0 <= abs(t["rotation_deg"]) <= 12.0
        assert 0.8 <= t["zoom"] <= 1.5
        assert max(abs(t["shift"][0]), abs(t["shift"][1])) >= 0.1


def test_subject_lands_where_shift_says():
    photo = _marker_photo()
    for seed in range(6):
        poor, t = poor_framing(photo, np.random.default_rng(seed), p_cut_off=0.0)
        arr = np.asarray(poor).astype(int)
        red = (arr[..., 0] > 200) & (arr[..., 1] < 80) & (arr[..., 2] < 80)
        ys, xs = np.nonzero(red)
        cx, cy = xs.mean() / poor.width - 0.5, ys.mean() / poor.height - 0.5
        assert abs(cx - t["shift"][0]) < 0.03 and abs(cy - t["shift"][1]) < 0.03


def test_positive_rotation_tilts_the_horizon_counter_clockwise():
    photo = _marker_photo()
    poor, t = poor_framing(photo, np.random.default_rng(0), min_rotation=8, max_rotation=8, p_cut_off=0.0,
                           zoom_range=(1.0, 1.0), max_shift=0.0, p_aspect_change=0.0)
    arr = np.asarray(poor).astype(int)
    dark = arr.sum(-1) < 100
    ys, xs = np.nonzero(dark)
    slope = np.polyfit(xs, ys, 1)[0]  # y grows downward
    angle = -math.degrees(math.atan(slope))  # counter-clockwise positive
    assert abs(angle - t["rotation_deg"]) < 1.0


def test_cut_off_hides_part_of_the_subject():
    cuts = [poor_framing(sample_photo("astronaut"), np.random.default_rng(s), p_cut_off=1.0)[1] for s in range(5)]
    assert all(t["subject_cut_off"] and "cut_off" in t["flaws"] and t["zoom"] <= 1.0 for t in cuts)


def test_framing_pair_good_is_a_crop_and_poor_shows_real_surroundings():
    photo = sample_photo("rocket")
    good, poor, t = framing_pair(photo, np.random.default_rng(3), good_fraction=0.6)
    x0, y0, w, h = t["good_box"]
    assert good.size == (w, h) == tuple(t["good_size"])
    assert np.array_equal(np.asarray(good), np.asarray(photo.crop((x0, y0, x0 + w, y0 + h))))
    # the matrix maps the good centre to the shifted centre of the poor frame
    M = np.array(t["matrix"])
    p = M @ np.array([w / 2, h / 2, 1.0])
    assert abs(p[0] / poor.width - 0.5 - t["shift"][0]) < 1e-6
    assert abs(p[1] / poor.height - 0.5 - t["shift"][1]) < 1e-6


def test_overlays_draw_grid_subtitle_band_and_ui_bar():
    base = Image.new("RGB", (320, 240), (90, 120, 60))
    out = np.asarray(draw_overlays(base, np.random.default_rng(0), text="Keep the horizon level")).astype(int)
    src = np.asarray(base).astype(int)
    assert out.shape == src.shape
    # grid lines at the thirds are bright
    assert out[120, 107].sum() > src[120, 107].sum() + 200 or out[100, 107].sum() > src[100, 107].sum() + 200
    # the subtitle band (80% of the height) and the top UI bar are darker
    assert out[200, 5].sum() < src[200, 5].sum() - 100
    assert out[3, 5].sum() < src[3, 5].sum() - 100
    plain = np.asarray(draw_overlays(base, np.random.default_rng(0), subtitles=False, ui=False, grid=False))
    assert np.array_equal(plain, src)

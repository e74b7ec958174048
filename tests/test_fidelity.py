"""The fidelity table (docs/fidelity.md) against the a40 profile's defaults,
and the release's settings that are library functions: the fixed render of
its evaluation and the policy's pixel range."""
from __future__ import annotations

import importlib
import math
import re
from functools import lru_cache
from pathlib import Path

import pytest
import yaml
from PIL import Image

DOC = Path(__file__).resolve().parents[1] / "docs" / "fidelity.md"
COLUMNS = ["area", "setting", "key", "paper", "release", "ours", "why"]
JOBS = {"sft": "SFTConfig", "grpo_a": "GrpoAConfig", "editor_lora": "EditorLoraConfig",
        "reconstruct": "ReconstructConfig", "vcmp": "VcmpConfig"}
NUMBER = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")


def table_rows() -> list[dict]:
    """The rows of the document's table, as dicts keyed by COLUMNS."""
    lines = [line.strip() for line in DOC.read_text().splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("| area |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    assert header == COLUMNS, header
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(COLUMNS), f"a row of docs/fidelity.md has {len(cells)} cells: {line}"
        rows.append(dict(zip(COLUMNS, cells)))
    return rows


def value(cell: str):
    """A cell as a value: backticks dropped, 1,048,576 read as a number, YAML
    scalars and lists parsed, numbers like 1e-4 read as floats; prose stays a string."""
    text = cell.strip().strip("`")
    if NUMBER.match(text):
        text = text.replace(",", "")
    try:
        parsed = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return text
    if isinstance(parsed, str):
        try:
            return float(parsed)
        except ValueError:
            return parsed
    return parsed


def same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@lru_cache(maxsize=None)
def a40_config(job: str):
    from aesformer.config import load_config

    schema = getattr(importlib.import_module(f"aesformer.jobs.{job}"), JOBS[job])
    return load_config(schema, job, ["profile=a40"])


def resolved(job: str, key: str):
    node = a40_config(job)
    for part in key.split("."):
        node = getattr(node, part)
    return node


def keyed_rows() -> list[dict]:
    return [r for r in table_rows() if r["key"].startswith("`")]


def test_the_table_covers_every_area_and_names_real_jobs():
    rows = table_rows()
    assert {r["area"] for r in rows} == {"SFT", "GRPO-A", "Rewards", "Editor", "Inference", "VCMP"}
    for r in keyed_rows():
        job, _, key = r["key"].strip("`").partition(":")
        assert job in JOBS and key, r["key"]
    for r in rows:
        assert r["key"].startswith("`") or r["key"] == "in code", r


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_keyed_row_is_the_a40_default(job):
    wrong = []
    for r in keyed_rows():
        row_job, _, key = r["key"].strip("`").partition(":")
        if row_job != job:
            continue
        got = resolved(job, key)
        if not same(got, value(r["ours"])):
            wrong.append(f"{job}:{key}: docs/fidelity.md says {r['ours']}, profile=a40 resolves {got!r}")
    assert not wrong, "\n".join(wrong)


def test_every_difference_has_its_reason():
    """Where the release (or, without a release value, the paper) gives a
    value that differs from ours, the row says why."""
    for r in table_rows():
        source = r["release"] if r["release"] != "—" else r["paper"]
        if source == "—":
            continue
        theirs, ours = value(source), value(r["ours"])
        comparable = not isinstance(theirs, str) or theirs == ours
        if comparable and not same(theirs, ours):
            assert r["why"], f"{r['area']} {r['setting']}: {source} vs {r['ours']} without a reason"


def test_the_settings_the_release_differs_in_are_in_the_table():
    keys = {r["key"].strip("`") for r in keyed_rows()}
    for key in ("grpo_a:learner.clip_ratio_low", "grpo_a:learner.clip_ratio_high", "grpo_a:learner.dual_clip",
                "grpo_a:reward.prompts", "grpo_a:reward.judge_text", "grpo_a:reward.image_max_side",
                "grpo_a:reward.max_model_len", "grpo_a:reward.format", "grpo_a:val_every", "grpo_a:val_prompts",
                "grpo_a:rollout.min_pixels", "grpo_a:rollout.max_pixels", "editor_lora:weight_decay",
                "reconstruct:editor.render", "vcmp:screen_vlm", "vcmp:quality.iqa.model", "vcmp:quality.iqa.task",
                "vcmp:quality.aesthetic.kind", "vcmp:quality.aesthetic.clip_weights"):
        assert key in keys, key


def test_released_render_is_1088_wide_1440_high_with_seed_1234():
    from aesformer.pipeline import output_size, render_settings

    released = render_settings("released", seed=7)
    assert released == {"width": 1088, "height": 1440, "seed": 1234}
    landscape = Image.new("RGB", (400, 300))
    assert output_size(landscape, height=released["height"], width=released["width"]) == (1088, 1440)
    # the default keeps the photo's aspect and the job's seed
    assert render_settings("aspect", seed=7) == {"width": None, "height": None, "seed": 7}
    with pytest.raises(ValueError, match="aspect, released"):
        render_settings("square")


def test_policy_photos_are_scaled_into_the_released_pixel_range():
    from aesformer.sft import fit_pixels

    small = fit_pixels(Image.new("RGB", (256, 128)), 262144, 4194304)  # 32,768 px: scaled up by sqrt(8)
    assert small.size == (725, 363) and small.width * small.height >= 262144
    big = fit_pixels(Image.new("RGB", (4000, 3000)), 262144, 4194304)  # 12 MP: scaled down
    assert big.width * big.height <= 4194304 and abs(big.width / big.height - 4 / 3) < 0.01
    inside = Image.new("RGB", (1000, 800))
    assert fit_pixels(inside, 262144, 4194304) is inside
    assert fit_pixels(Image.new("RGB", (64, 64)), None, 16384).size == (64, 64)

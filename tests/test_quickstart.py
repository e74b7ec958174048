"""README's first command: the quickstart runs every stage on the tiny
profile, in under 10 minutes on 2 cores, and ends by saying where each
result lies. Its SFT stage, trained on the pairs the quickstart mined and
distilled, writes plans in format for those photos."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from helpers import PYTHON, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STAGES = ["models", "samples", "vcmp", "distill", "sft", "grpo_a", "editor_lora", "reconstruct"]


@pytest.fixture(scope="module")
def quickstart(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    t0 = time.perf_counter()
    proc = run([PYTHON, "jobs/quickstart.py", f"output={out}"], timeout=850, env=dict(os.environ))
    return out, proc.stdout + proc.stderr, time.perf_counter() - t0


def test_every_stage_runs_within_ten_minutes(quickstart):
    out, _, wall = quickstart
    summary = json.loads((out / "quickstart.json").read_text())
    assert list(summary["stages"]) == STAGES
    assert wall < 600, f"quickstart took {wall:.0f}s"
    stages = summary["stages"]
    assert stages["vcmp"]["pairs"] >= 10
    assert stages["sft"]["done"] and stages["grpo_a"]["finished"]
    assert stages["reconstruct"]["ok"] == stages["reconstruct"]["photos"] >= 10


def test_it_ends_by_saying_where_each_result_lies(quickstart):
    out, printed, _ = quickstart
    tail = printed[printed.index("quickstart finished"):]
    lines = tail.splitlines()
    for stage in STAGES[1:]:
        assert any(line.startswith(f"  {stage} ") for line in lines), stage
    assert "Open first:" in tail and "contact_sheet.png" in tail
    assert "mlflow ui --backend-store-uri sqlite:///" in tail
    assert "tiny editor paints noise" in tail
    for line in lines:  # every path it names exists
        for word in line.replace(",", " ").replace("(", " ").replace(")", " ").split():
            if word.startswith(str(out)) and "<stage>" not in word:
                assert Path(word).exists(), line


def test_its_console_fits_on_two_screens(quickstart):
    _, printed, _ = quickstart
    lines = printed.rstrip().splitlines()
    assert len(lines) < 100, "\n".join(lines)


def test_the_sft_thinker_writes_its_plans_in_format(quickstart):
    """Greedy plans of the exported tiny thinker for the quickstart's own
    photos have format_reward 1.0 for at least 80% of them."""
    from aesformer import sft
    from aesformer.actions import format_reward
    from aesformer.data import decode_image, read_pairs
    from sft_pairs import greedy_plans

    out, _, _ = quickstart
    rows = read_pairs(out / "distill" / "pairs", columns=["poor_image"])
    photos = [sft.cap_pixels(decode_image(r["poor_image"]), 4096) for r in rows]  # the tiny profile's image cap
    plans = greedy_plans(out / "sft" / "export" / "merged", photos, max_new_tokens=400)
    ok = sum(format_reward(p) for p in plans)
    assert ok >= 0.8 * len(plans), (ok, len(plans), plans[:2])


def test_reconstruction_follows_the_trained_thinkers_plans(quickstart):
    """The thinker samples at temperature 0.6 here, so a few plans slip; most parse."""
    out, _, _ = quickstart
    rec = json.loads((out / "quickstart.json").read_text())["stages"]["reconstruct"]
    assert rec["unparsed_plans"] <= rec["photos"] // 2, rec
    assert len(list((out / "reconstruct" / "images").glob("*.png"))) == rec["ok"]


def test_its_evaluate_stage_adds_the_report_to_the_run(quickstart):
    """`stages=[evaluate]` in the same output, after the run above: the stage
    finds the earlier stages' results (the distilled pairs, the GRPO-A
    thinker, the editor LoRA) in quickstart.json, evaluates the four built-in
    systems on 4 of the pairs and writes the whole report into the run's
    MLflow store; quickstart.json then lists every stage."""
    from mlflow.tracking import MlflowClient

    out, _, _ = quickstart
    t0 = time.perf_counter()
    proc = run([PYTHON, "jobs/quickstart.py", f"output={out}", "stages=[evaluate]"], timeout=840,
               env=dict(os.environ))
    wall = time.perf_counter() - t0
    summary = json.loads((out / "quickstart.json").read_text())
    assert list(summary["stages"]) == STAGES + ["evaluate"]
    result = summary["stages"]["evaluate"]
    # 4 systems x 4 photos x (poor, good), each in both A/B orders
    assert result["photos"] == 4 and result["judge_failed"] == 0 and result["judge_asked"] == 4 * 4 * 2 * 2
    report = json.loads((out / "evaluate" / "report.json").read_text())["summary"]["systems"]
    assert abs(report["identity"]["win_vs_poor"]["rate"] - 50.0) <= 2.0, report["identity"]
    ev = out / "evaluate"
    for name in ("report.md", "report.html", "report.json", "win_rates.png", "scores.png", "cases.png"):
        assert (ev / name).stat().st_size > 0, name
    md = (ev / "report.md").read_text()
    for label in ("AesFormer", "Editor, no thinker", "Base thinker + editor", "Identity (poor photo)"):
        assert f"| {label} | ours |" in md, label
    assert "| AesFormer | paper | AesThinker | 65.33 |" in md
    # AesFormer is the GRPO-A thinker with the trained editor LoRA of the run above
    spec = json.loads((ev / "outputs" / "aesformer" / "system.json").read_text())
    assert Path(spec["thinker"]) == (out / "grpo_a" / "model").resolve()
    assert Path(spec["lora"]) == (out / "editor_lora" / "lora").resolve()
    tail = proc.stdout[proc.stdout.index("quickstart finished"):]
    assert any(line.startswith("  evaluate ") and line.rstrip().endswith("report.html") for line in tail.splitlines())
    assert f"the evaluation report:     {ev / 'report.html'}" in tail
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("aesformer").experiment_id],
                              "tags.`mlflow.runName` LIKE 'evaluate%'")
    assert runs, "no evaluate run in the quickstart's MLflow store"
    print(f"evaluate stage: {wall:.0f}s")

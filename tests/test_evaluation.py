"""Evaluation math and formats: win rates with ties, bootstrap intervals,
position bias, Cohen's kappa, verdict parsing, A/B orders, systems, the report."""

import numpy as np
import pytest

from aesformer.evaluation import judge, paper, report, stats
from aesformer.evaluation.store import Store, vote_outcome
from aesformer.evaluation.systems import SystemSpec, parse_systems, shuffle_plan


def test_a_tie_counts_half_and_both_orders_are_averaged():
    r = stats.win_rate([["win"], ["tie"], ["loss"], ["win", "loss"]], n_boot=200)
    assert r["rate"] == pytest.approx(100 * (1 + 0.5 + 0 + 0.5) / 4)
    assert (r["wins"], r["ties"], r["losses"], r["n"]) == (2, 1, 2, 4)
    assert r["lo"] <= r["rate"] <= r["hi"]


def test_bootstrap_interval_is_reproducible_and_narrows_with_more_data():
    rng = np.random.default_rng(0)
    small, large = rng.integers(0, 2, 20), rng.integers(0, 2, 2000)
    assert stats.bootstrap_ci(small, seed=1) == stats.bootstrap_ci(small, seed=1)
    lo_s, hi_s = stats.bootstrap_ci(small)
    lo_l, hi_l = stats.bootstrap_ci(large)
    assert hi_l - lo_l < (hi_s - lo_s) / 4
    assert lo_l < large.mean() < hi_l
    assert stats.bootstrap_ci([1, 1, 1]) == (1.0, 1.0)


def test_position_bias_from_both_orders():
    # a judge that always picks the first image: fully biased, never consistent
    b = stats.position_bias([("A", "A"), ("A", "A")])
    assert b == {"first_rate": 1.0, "consistent": 0.0, "n": 2}
    # a judge that names the same image both times (the output: A then B)
    assert stats.position_bias([("A", "B"), ("tie", "tie")]) == {"first_rate": 0.5, "consistent": 1.0, "n": 2}


def test_cohen_kappa_matches_hand_computation():
    a = ["win", "win", "loss", "loss", "tie", "win"]
    b = ["win", "loss", "loss", "loss", "tie", "win"]
    # po = 5/6; pe = (3/6*2/6) + (2/6*3/6) + (1/6*1/6) = 13/36
    assert stats.cohen_kappa(a, b) == pytest.approx((5 / 6 - 13 / 36) / (1 - 13 / 36))
    assert stats.cohen_kappa(["win", "loss"], ["win", "loss"]) == 1.0
    assert stats.cohen_kappa([], []) is None
    with pytest.raises(ValueError, match="as many labels"):
        stats.cohen_kappa(["win"], [])


@pytest.mark.parametrize("text, verdict", [
    ('{"winner": "A", "reason": "better framing"}', "A"),
    ('Sure! ```json\n{"winner": "b", "reason": "x"}\n```', "B"),
    ('{"winner": "tie", "reason": "same"}', "tie"),
    ("B", "B"), ("Image A.", "A"), ("tie", "tie"),
    ('{"winner": "A", "reas', None),          # truncated JSON
    ("Both photos are lovely.", None), ("", None), (None, None),
])
def test_verdict_parsing(text, verdict):
    assert judge.parse_verdict(text) == verdict


def test_outcome_follows_the_order_shown():
    assert judge.outcome("A", judge.OUTPUT_FIRST) == "win"
    assert judge.outcome("A", judge.REFERENCE_FIRST) == "loss"
    assert judge.outcome("B", judge.REFERENCE_FIRST) == "win"
    assert judge.outcome("tie", judge.OUTPUT_FIRST) == "tie"
    assert judge.outcome(None, judge.OUTPUT_FIRST) is None


def test_orders_are_random_per_comparison_reproducible_and_both_on_a_share():
    keys = [judge.comparison_key("s", f"p{i}", 0, "poor") for i in range(400)]
    one = [judge.orders_for(k, job_seed=1, both_orders=0.0) for k in keys]
    assert all(len(o) == 1 for o in one)
    first = sum(o == [judge.OUTPUT_FIRST] for o in one) / len(one)
    assert 0.4 < first < 0.6
    assert one == [judge.orders_for(k, job_seed=1, both_orders=0.0) for k in keys]
    both = sum(len(judge.orders_for(k, job_seed=1, both_orders=0.25)) == 2 for k in keys) / len(keys)
    assert 0.18 < both < 0.32
    assert all(len(judge.orders_for(k, job_seed=1, both_orders=1.0)) == 2 for k in keys)


def test_local_judge_reading_picks_the_most_likely_letter():
    assert judge.verdict_from_logprobs({"A": -2.0, "B": -0.5, "T": -3.0}) == "B"
    assert judge.verdict_from_logprobs({"A": -2.0, "B": -2.5, "T": -0.1}) == "tie"


def test_systems_from_config_reject_unknown_keys_and_names():
    specs = parse_systems({"a": {"thinker": "none", "lora": "none"}, "b": {"editor": "identity"}}, ["b"])
    assert [s.name for s in specs] == ["b"] and specs[0].label == "b"
    from aesformer.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key"):
        parse_systems({"a": {"thinkr": "none"}})
    with pytest.raises(ConfigError, match="not defined"):
        parse_systems({"a": {}}, ["zzz"])


def test_shuffled_plan_keeps_every_line_in_another_order():
    from aesformer.actions import ActionPlan

    plan = ActionPlan(*(f"step {i}" for i in range(1, 8))).render()
    out = shuffle_plan(plan, seed=3)
    assert sorted(out.splitlines()) == sorted(plan.splitlines()) and out != plan
    assert shuffle_plan(plan, seed=3) == out
    assert shuffle_plan("free text", seed=3) == "free text"


def test_store_keeps_verdicts_scores_and_one_vote_per_rater_and_pair(tmp_path):
    s = Store(tmp_path / "e.db")
    s.put_verdict({"key": "k", "ord": "output_first", "system": "x", "photo": "p", "seed": 0, "reference": "poor",
                   "verdict": None, "outcome": None, "raw": "??", "error": "no verdict", "failures": ["HTTP 429"],
                   "requests": 2, "judge": "j"})
    assert s.verdict_keys() == {("k", "output_first")}
    assert s.verdicts()[0]["failures"] == ["HTTP 429"]
    assert s.put_vote("r1", "x|p|0|poor", "output", "reference", "left")
    assert not s.put_vote("r1", "x|p|0|poor", "reference", "output", "right")
    assert s.voted_pairs("r1") == {"x|p|0|poor"}
    assert vote_outcome(s.votes()[0]) == "win"
    assert vote_outcome({"choice": "right", "left_image": "output", "right_image": "reference"}) == "loss"


def _verdict(system, photo, ref, order, verdict):
    key = judge.comparison_key(system, photo, 0, ref)
    return {"key": key, "ord": order, "system": system, "photo": photo, "seed": 0, "reference": ref,
            "verdict": verdict, "outcome": judge.outcome(verdict, order), "raw": verdict, "error": None,
            "failures": [], "requests": 1, "judge": "j"}


def test_report_tables_put_the_papers_figures_beside_ours(tmp_path):
    systems = [SystemSpec(name="aesformer", label="AesFormer", paper="AesFormer"),
               SystemSpec(name="identity", label="Identity", editor="identity")]
    verdicts = [_verdict("aesformer", f"p{i}", "poor", judge.OUTPUT_FIRST, "A") for i in range(3)]
    verdicts += [_verdict("aesformer", f"p{i}", "good", judge.REFERENCE_FIRST, "A") for i in range(3)]
    verdicts += [_verdict("identity", "p0", "poor", o, "A") for o in judge.ORDERS]
    scores = [{"scorer": "laion", "system": "aesformer", "photo": f"p{i}", "seed": 0, "value": 5.0 + i}
              for i in range(3)]
    votes = [{"rater": "r", "pair": judge.comparison_key("aesformer", "p0", 0, "poor"), "left_image": "reference",
              "right_image": "output", "choice": "right", "created": 0.0}]
    summary = report.summarise(systems, verdicts, scores, votes, n_boot=200)
    a = summary["systems"]["aesformer"]
    assert a["win_vs_poor"]["rate"] == 100.0 and a["win_vs_good"]["rate"] == 0.0
    assert a["scores"]["laion"]["mean"] == pytest.approx(6.0)
    assert a["human_vs_poor"]["rate"] == 100.0 and a["kappa_n"] == 1
    ident = summary["systems"]["identity"]
    assert ident["win_vs_poor"]["rate"] == 50.0
    assert ident["position_bias"] == {"first_rate": 1.0, "consistent": 0.0, "n": 1}
    meta = {"judge": {"kind": "openai", "model": "gpt-4o"}, "scorers": {"artimuse": "skipped: weights is not set"},
            "scorer_columns": {"laion": "laion"}}
    md = report.markdown(summary, meta)
    # the paper's Table 1 columns: judge and human win rates against poor, then good, then the scorers
    assert ("| system | source | thinker | win vs poor % [95% CI] | human vs poor % | win vs good % [95% CI] | "
            "human vs good % | ArtiMuse | LAION aesthetic | Q-Align | judge failures | κ judge-human |") in md
    assert ("| AesFormer | ours | trained thinker | 100.0 [100.0, 100.0] (n=3) | 100.0 [100.0, 100.0] (n=1) | "
            "0.0 [0.0, 0.0] (n=3) | n/a | n/a | 6.00 | n/a | 0 | 1.00 |") in md
    assert "| AesFormer | paper | AesThinker | 65.33 | 68.63 | 26.25 | 24.39 | 47.76 | 5.60 | 3.51 |" in md
    # the paper's other rows follow ours, a row that was not transcribed as n/a
    assert "| Nano Banana Pro | paper | None | 54.44 | 72.55 | 16.67 | 21.95 | 50.90 | 5.59 | 3.24 |" in md
    assert "| Bagel + GPT-4o thinker | paper | GPT-4o | n/a | n/a | n/a | n/a | n/a | n/a | n/a |" in md
    assert md.index("| AesFormer | ours |") < md.index("| AesFormer | paper |") < md.index("| Nano Banana Pro |")
    assert "Table 2" not in md  # none of these systems is in the ablation
    assert "skipped: weights is not set" in md and "model=gpt-4o" in md and "half a win" in md
    png = report.plot_win_rates(summary, tmp_path / "w.png")
    page = report.html(summary, meta, [("Win rates", png)])
    assert "data:image/png;base64," in page and "65.33" in page and "src=\"http" not in page
    assert paper.CITATION in md and "arXiv:2605.22126" in md and paper.SOURCE in md


def test_the_ablation_table_is_shaped_like_the_papers_table_2():
    systems = [SystemSpec(name="s1a", label="SFT only", thinker="sft", lora="none", table=2, paper="S1a"),
               SystemSpec(name="full", label="SFT + GRPO-A + editor LoRA", table=2, paper="S1a + S1b + S2")]
    verdicts = [_verdict("s1a", "p0", "poor", judge.OUTPUT_FIRST, "tie")]
    summary = report.summarise(systems, verdicts, [], n_boot=100)
    header, rows = report.table_rows(summary, 2, {})
    # no thinker and no human columns, as in the paper
    assert header == ["system", "source", "win vs poor % [95% CI]", "win vs good % [95% CI]", "ArtiMuse",
                      "LAION aesthetic", "Q-Align", "judge failures"]
    assert rows[0] == ["SFT only", "ours", "50.0 [50.0, 50.0] (n=1)", "n/a", "n/a", "n/a", "n/a", "0"]
    assert rows[1] == ["S1a", "paper", "61.04", "24.58", "47.70", "5.58", "3.48", ""]
    assert rows[3] == ["S1a + S1b + S2", "paper", "65.33", "26.25", "47.76", "5.60", "3.51", ""]
    # then the paper's rows without a system of ours here, in the paper's order
    assert [r[0] for r in rows[4:]] == ["Baseline (Qwen-Image-Edit-2511)", "S1a shuffle", "S1a + S2"]
    assert "## Table 2: training stages" in report.markdown(summary, {})
    assert report.table_rows(summary, 1, {}) == (report.table_rows(summary, 1, {})[0], [])


def test_paper_figures_are_the_published_ones():
    """Every figure of Tables 1 and 2 as read (see paper.SOURCE); None where unread."""
    t1 = {name: [row[c] for c in paper.COLUMNS] for name, row in paper.TABLE_1.items()}
    assert t1["AesFormer"] == [65.33, 68.63, 26.25, 24.39, 47.76, 5.60, 3.51]
    assert t1["Nano Banana Pro"] == [54.44, 72.55, 16.67, 21.95, 50.90, 5.59, 3.24]
    assert t1["FLUX.1 Kontext"] == [12.96, 5.88, 2.66, 3.66, 38.34, 5.07, 2.83]
    assert t1["Bagel"] == [12.40, 17.65, 7.75, 12.20, 37.69, 4.94, 2.58]
    assert t1["Step1X-Edit-v1.1"] == [15.28, 11.76, 13.84, 13.41, 37.14, 5.33, 3.37]
    assert t1["Qwen-Image-Edit-2511"] == [16.50, 9.80, 7.64, 12.20, 46.65, 5.44, 3.20]
    unread = [name for name, figures in t1.items() if figures == [None] * 7]
    assert len(unread) == 8 and all(" thinker" in name for name in unread)
    assert paper.TABLE_1["AesFormer"]["thinker"] == "AesThinker"
    t2 = {name: [row[c] for c in paper.TABLE_COLUMNS[2]] for name, row in paper.TABLE_2.items()}
    assert t2 == {"Baseline (Qwen-Image-Edit-2511)": [16.50, 7.64, 46.65, 5.44, 3.20],
                  "S1a shuffle": [58.69, 18.60, 46.16, 5.49, 3.36],
                  "S1a": [61.04, 24.58, 47.70, 5.58, 3.48],
                  "S1a + S2": [61.13, 24.14, 47.74, 5.58, 3.46],
                  "S1a + S1b + S2": [65.33, 26.25, 47.76, 5.60, 3.51]}
    # the full system of the ablation is AesFormer's row of Table 1, and the baseline the bare editor's
    assert t2["S1a + S1b + S2"] == [t1["AesFormer"][i] for i in (0, 2, 4, 5, 6)]
    assert t2["Baseline (Qwen-Image-Edit-2511)"] == [t1["Qwen-Image-Edit-2511"][i] for i in (0, 2, 4, 5, 6)]
    assert "Du" in paper.CITATION and "ICML 2026" in paper.CITATION and "2605.22126" in paper.BIBTEX


def test_the_stage_ablation_is_one_config_file():
    """conf/evaluate_ablation.yaml holds one system per row of the paper's Table 2."""
    from aesformer.config import load_config
    from aesformer.jobs.evaluate import EvaluateConfig, system_catalog

    cfg = load_config(EvaluateConfig, "evaluate", ["catalog_file=evaluate_ablation.yaml"])
    specs = {s.paper: s for s in system_catalog(cfg)}
    assert list(specs) == list(paper.TABLE_2) and all(s.table == 2 for s in specs.values())
    fields = {row: (s.thinker, s.lora, s.shuffle_dimensions, s.editor) for row, s in specs.items()}
    assert fields == {"Baseline (Qwen-Image-Edit-2511)": ("none", "none", False, "base"),  # the bare editor
                      "S1a shuffle": ("sft", "none", True, "base"),                       # S1a, order shuffled
                      "S1a": ("sft", "none", False, "base"),                              # SFT thinker
                      "S1a + S2": ("sft", "trained", False, "base"),                      # + editor LoRA
                      "S1a + S1b + S2": ("trained", "trained", False, "base")}            # + GRPO-A
    # the built-ins stand for Table 1's rows, one field overridden from the command line
    cfg = load_config(EvaluateConfig, "evaluate", ["catalog.aesformer.lora=none"])
    builtins = system_catalog(cfg)
    aes = builtins[0]
    assert (aes.name, aes.lora, aes.paper, aes.label) == ("aesformer", "none", "AesFormer", "AesFormer")
    assert all(s.paper in paper.TABLE_1 for s in builtins if s.paper)
    assert {s.name: s.paper for s in builtins}["editor_only"] == "Qwen-Image-Edit-2511"

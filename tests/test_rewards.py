"""GRPO-A rewards: expected judge score, weighted sum, prompts, rule alignment."""
import math

import numpy as np
import pytest
import torch

from aesformer.actions import ActionPlan
from aesformer.rewards import (
    ALIGNMENT_RUBRIC,
    CREATIVITY_RUBRIC,
    alignment_prompt,
    combine,
    creativity_prompt,
    expected_score,
    judge_messages,
    rule_alignment,
)

PLAN = ActionPlan("crop to 4:5", "horizon on the lower third", "lower the camera", "subject to the left third",
                  "turn shoulders to the light", "focus on the eyes", "warmer white balance")


def test_expected_score_of_uniform_logits_is_one_half():
    assert expected_score(torch.zeros(6)).item() == pytest.approx(0.5)
    assert expected_score([0.0] * 6) == pytest.approx(0.5)


def test_expected_score_of_a_confident_judge_is_its_digit_over_five():
    logits = torch.full((6,), -1e4)
    logits[4] = 0.0
    assert expected_score(logits).item() == pytest.approx(0.8)


def test_expected_score_hand_computed_two_way_split():
    # log-probs of 0.25 on "1" and 0.75 on "5": E = 0.25*1 + 0.75*5 = 4.0 → 0.8
    lp = torch.tensor([-math.inf, math.log(0.25), -math.inf, -math.inf, -math.inf, math.log(0.75)])
    assert expected_score(lp).item() == pytest.approx(0.8)


def test_expected_score_keeps_leading_dimensions_and_accepts_numpy():
    logits = torch.zeros(2, 3, 6)
    assert expected_score(logits).shape == (2, 3)
    out = expected_score(np.zeros((4, 6)))
    assert isinstance(out, np.ndarray) and out.shape == (4,) and np.allclose(out, 0.5)
    with pytest.raises(ValueError, match="6"):
        expected_score(torch.zeros(5))


def test_combine_weights_format_alignment_creativity():
    assert combine(1, 0.5, 0.25) == pytest.approx(0.1 + 0.25 + 0.1)
    assert combine(1, 1, 1, weights=(0.2, 0.3, 0.5)) == pytest.approx(1.0)
    t = combine(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 1.0]), torch.tensor([0.25, 0.0]))
    assert torch.allclose(t, torch.tensor([0.45, 0.5]))


def test_alignment_prompt_has_rubric_first_and_plans_last():
    ref = PLAN.replace(color="cooler tones")
    text = alignment_prompt(PLAN, ref)
    assert text.startswith(ALIGNMENT_RUBRIC)
    assert text.index(ref.render()) < text.index(PLAN.render())
    assert text.rstrip().endswith("single digit from 0 to 5 and nothing else.")


def test_creativity_prompt_puts_photo_between_rubric_and_plan():
    parts = creativity_prompt(PLAN)
    assert [p["type"] for p in parts] == ["text", "image", "text"]
    assert parts[0]["text"].startswith(CREATIVITY_RUBRIC)
    assert PLAN.render() in parts[2]["text"]
    assert "at most 2" in CREATIVITY_RUBRIC and "0" in CREATIVITY_RUBRIC
    msgs = judge_messages(parts, image="PHOTO")
    assert msgs[0]["role"] == "user" and msgs[0]["content"][1] == {"type": "image", "image": "PHOTO"}
    assert "image" not in parts[1]  # the builder's output is not mutated


def test_rubric_is_a_shared_prefix_across_requests():
    a = creativity_prompt(PLAN)[0]["text"]
    b = creativity_prompt(PLAN.replace(pose="raise the chin"))[0]["text"]
    assert a == b
    assert alignment_prompt(PLAN, PLAN).startswith(ALIGNMENT_RUBRIC)


def test_rule_alignment_identical_is_one_and_garbage_is_zero():
    assert rule_alignment(PLAN, PLAN) == 1.0
    assert rule_alignment(PLAN.render(), PLAN) == 1.0
    assert rule_alignment("no plan at all", PLAN) == 0.0


def test_rule_alignment_hand_computed_one_dimension_differs():
    # colour: "warmer white balance" vs "cooler white balance": overlap 2 of 3+3 → F1 = 2/3
    ref = PLAN.replace(color="cooler white balance")
    assert rule_alignment(PLAN, ref) == pytest.approx((6 + 2 / 3) / 7)


def test_rule_alignment_reads_broken_text_dimension_by_dimension():
    lines = PLAN.render().splitlines()
    broken = "\n".join(lines[:3])  # only the first three dimensions survive
    assert rule_alignment(broken, PLAN) == pytest.approx(3 / 7)

"""GRPO-A rewards: expected judge score, weighted sum, prompt files, what the
judge reads, the two format rewards, rule alignment."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from aesformer.actions import ActionPlan
from aesformer.rewards import (
    alignment_request,
    combine,
    creativity_request,
    expected_score,
    format_score,
    judge_text,
    load_prompts,
    rule_alignment,
    shrink_image,
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


def _texts(request: dict) -> list:
    return [p.get("text") if p["type"] == "text" else "<image>" for p in request["messages"][0]["content"]]


def test_default_alignment_prompt_gives_plan_then_reference_then_rubric():
    prompts = load_prompts()  # conf/prompts/default.yaml
    ref = PLAN.replace(color="cooler tones")
    [text] = _texts(alignment_request(prompts, PLAN, ref))
    plan_at, ref_at = text.index(judge_text(PLAN)), text.index(judge_text(ref))
    zero_at, five_at = text.index("0: no match"), text.index("5: a close match")
    assert plan_at < ref_at < zero_at < five_at
    # the released anchors and what to ignore
    assert "key operations conflict" in text and "almost nothing meaningful" in text[zero_at:five_at]
    assert "key operations and the important details essentially agree" in text[five_at:]
    assert "Wording, length and writing style must not change the score" in text
    assert text.rstrip().endswith("one digit from 0 to 5.")


def test_default_creativity_prompt_gives_photo_then_plan_then_structural_rubric():
    prompts = load_prompts("default")
    request = creativity_request(prompts, PLAN, Image.new("RGB", (64, 48)))
    parts = request["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image", "text"]
    assert parts[0]["image"].size == (64, 48)  # already under 512 pixels
    text = parts[1]["text"]
    assert text.index(judge_text(PLAN)) < text.index("Structural edits")
    for kind in ("composition and crop", "camera viewpoint", "subject position", "subject pose"):
        assert kind in text
    # penalties, caps and what a 0, 4 and 5 need
    assert "colour, exposure or filter changes with almost no structural edit: at most 2" in text
    assert "contradict each other" in text and "general advice without operations" in text
    assert "the hard constraint is clearly broken: 0 or 1" in text
    assert "0: introduces or assumes new elements, changes who the subject is" in text
    assert "5: two or more kinds of structural edit" in text
    assert "4: at least one strong structural edit" in text


def test_judge_text_plain_drops_tags_and_whitespace_around_marks_and_keeps_headers():
    plan = ("<Ratio>(1) Aspect Ratio: crop to 4 / 5</Ratio>\n"
            "<Composition>(2) Framing and Composition: keep < 1/3 of the sky </Composition>")
    assert judge_text(plan, "plain") == ("(1) Aspect Ratio: crop to 4/5\n"
                                         "(2) Framing and Composition: keep<1/3 of the sky")
    assert judge_text(plan, "tagged") == plan
    # a rendered plan keeps its seven headers, one per line, and loses every tag
    plain = judge_text(PLAN)
    assert plain.splitlines()[0] == "(1) Aspect Ratio: crop to 4:5" and len(plain.splitlines()) == 7
    assert "<" not in plain and "(7) Color and Lighting Adjustment: warmer white balance" in plain
    with pytest.raises(ValueError, match="plain, tagged"):
        judge_text(plan, "html")


def test_judge_text_mode_reaches_both_plans_of_the_alignment_request():
    prompts = load_prompts()
    [plain] = _texts(alignment_request(prompts, PLAN, PLAN, "plain"))
    [tagged] = _texts(alignment_request(prompts, PLAN, PLAN, "tagged"))
    assert "<Ratio>" not in plain and plain.count("(1) Aspect Ratio: crop to 4:5") == 2
    assert tagged.count("<Ratio>(1) Aspect Ratio: crop to 4:5</Ratio>") == 2


def test_the_photo_for_creativity_is_shrunk_to_512_on_its_longer_side():
    photo = Image.new("RGB", (2000, 1000))
    assert shrink_image(photo, 512).size == (512, 256)
    assert shrink_image(Image.new("RGB", (333, 1000)), 512).size == (170, 512)  # 333·0.512 = 170.5, truncated
    assert shrink_image(photo, None) is photo
    sent = creativity_request(load_prompts(), PLAN, photo)["messages"][0]["content"][0]["image"]
    assert sent.size == (512, 256)
    assert creativity_request(load_prompts(), PLAN, photo, image_max_side=1000)["messages"][0]["content"][0][
        "image"].size == (1000, 500)


def test_a_prompt_file_given_by_path_is_used_as_written(tmp_path):
    # a prompt set in the released order for Rc: photo, "editing instruction: ...", rubric
    path = tmp_path / "mine.yaml"
    path.write_text('alignment:\n  - text: "model_output: {plan}\\nground_truth: {reference}\\n\\nRUBRIC A {x}"\n'
                    'creativity:\n  - image\n  - text: "editing instruction: {plan}\\n\\nRUBRIC C"\n')
    prompts = load_prompts(str(path))
    assert _texts(alignment_request(prompts, "plan a", "plan b")) == [
        "model_output: plan a\nground_truth: plan b\n\nRUBRIC A {x}"]
    assert _texts(creativity_request(prompts, "plan a", Image.new("RGB", (8, 8)))) == [
        "<image>", "editing instruction: plan a\n\nRUBRIC C"]
    # the plain form sent to the reward actors reloads to the same prompts
    again = load_prompts(prompts.to_dict())
    assert (again.alignment, again.creativity) == (prompts.alignment, prompts.creativity)


@pytest.mark.parametrize("content, message", [
    ("alignment: [{text: '{plan}'}]\ncreativity: [image, {text: '{plan}'}]", "must contain {reference}"),
    ("alignment: [{text: '{plan} {reference}'}]\ncreativity: [{text: '{plan}'}]", "photo exactly once"),
    ("alignment: [image, {text: '{plan} {reference}'}]\ncreativity: [image, {text: '{plan}'}]", "text only"),
    ("alignment: [{text: '{plan} {reference}'}]\ncreativity: [image, {text: '{plan}'}]\nanswer: x", "unknown: answer"),
    ("alignment: [{txt: '{plan} {reference}'}]\ncreativity: [image, {text: '{plan}'}]", "part 1"),
])
def test_a_broken_prompt_file_is_named_with_its_problem(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        load_prompts(str(path))
    assert str(path) in str(err.value)


def test_an_unknown_prompt_name_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="default"):
        load_prompts("no-such-prompts")


def test_format_strict_needs_the_tags_and_headers_mode_needs_only_the_headers_in_order():
    tagged = PLAN.render()
    untagged = judge_text(PLAN)  # headers only, as the released thinker's text reads after decoding
    chatty = "Here is my plan.\n" + tagged + "\nHope it helps!"
    assert format_score(tagged, "strict") == 1.0 and format_score(tagged, "headers") == 1.0
    assert format_score(untagged, "strict") == 0.0 and format_score(untagged, "headers") == 1.0
    assert format_score(chatty, "strict") == 0.0 and format_score(chatty, "headers") == 1.0
    swapped = untagged.replace("(3) Camera", "(X) Camera").replace("(4) Subject", "(3) Camera Position and "
                                                                   "Viewpoint: (4) Subject")
    assert format_score("\n".join(reversed(untagged.splitlines())), "headers") == 0.0  # out of order
    assert format_score(untagged.replace("(5) Subject Pose", "(5)Subject Pose"), "headers") == 1.0
    assert format_score(untagged.replace("(6) Depth", "( 6 ) Depth"), "headers") == 0.0  # as released
    assert format_score(swapped, "headers") == 1.0  # headers in order, whatever lies between them
    with pytest.raises(ValueError, match="strict, headers"):
        format_score(tagged, "loose")


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

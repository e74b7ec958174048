"""The seven-dimension action plan: order, rendering, parsing, format reward."""
import pytest

from aesformer.actions import (
    DIMENSIONS,
    KEYS,
    SPECIAL_TOKENS,
    THINKER_INSTRUCTION,
    ActionPlan,
    PlanFormatError,
    add_plan_tokens,
    extract_dimensions,
    format_reward,
    thinker_instruction,
    thinker_messages,
)

PLAN = ActionPlan(
    ratio="Crop to 4:5 portrait.",
    composition="Place the horizon on the lower third.",
    camera="Lower the camera to chest height.",
    position="Move the subject to the left third.",
    pose="Turn the shoulders 30 degrees to the light.",
    focus="Open to f/2.8 and focus on the eyes.",
    color="Warm the white balance slightly.",
)
LINES = PLAN.render().splitlines()


def test_seven_dimensions_in_paper_order():
    assert KEYS == ("ratio", "composition", "camera", "position", "pose", "focus", "color")
    assert [d.tag for d in DIMENSIONS] == ["Ratio", "Composition", "Camera", "Position", "Pose", "Focus", "Color"]
    assert DIMENSIONS[0].label == "(1) Aspect Ratio:"
    assert DIMENSIONS[1].label == "(2) Framing and Composition:"
    assert DIMENSIONS[2].label == "(3) Camera Position and Viewpoint:"
    assert DIMENSIONS[3].label == "(4) Subject Position:"
    assert DIMENSIONS[4].label == "(5) Subject Pose and Action Details:"
    assert DIMENSIONS[5].label == "(6) Depth of Field and Focus Control:"
    assert DIMENSIONS[6].label == "(7) Color and Lighting Adjustment:"


def test_special_tokens_are_open_then_close_per_dimension():
    assert len(SPECIAL_TOKENS) == 14
    assert SPECIAL_TOKENS[:4] == ("<Ratio>", "</Ratio>", "<Composition>", "</Composition>")
    assert SPECIAL_TOKENS[-2:] == ("<Color>", "</Color>")


def test_render_gives_seven_canonical_lines():
    assert len(LINES) == 7
    assert LINES[0] == "<Ratio>(1) Aspect Ratio: Crop to 4:5 portrait.</Ratio>"
    assert LINES[6] == "<Color>(7) Color and Lighting Adjustment: Warm the white balance slightly.</Color>"


def test_parse_inverts_render():
    assert ActionPlan.parse(PLAN.render()) == PLAN


def test_parse_tolerates_loose_whitespace():
    loose = "\n\n".join(LINES)
    loose = loose.replace("<Ratio>", "< Ratio >").replace("</Pose>", "< / Pose >").replace("</Color>", "</ Color>")
    loose = loose.replace("(3) Camera", "( 3 )  Camera").replace("Subject Position:", "Subject Position :")
    assert ActionPlan.parse("  \n" + loose + "\n  ") == PLAN
    assert format_reward(loose) == 1.0


def _error(text, **kw):
    with pytest.raises(PlanFormatError) as info:
        ActionPlan.parse(text, **kw)
    return info.value


def test_parse_error_names_missing_dimension():
    err = _error("\n".join(LINES[:2] + LINES[3:]))
    assert (err.dimension, err.problem) == ("camera", "missing")
    assert "camera" in str(err)


def test_parse_error_names_unclosed_dimension():
    err = _error("\n".join(LINES).replace("</Focus>", ""))
    assert (err.dimension, err.problem) == ("focus", "unclosed")
    assert "focus" in str(err)


def test_parse_error_names_out_of_order_dimension():
    err = _error("\n".join([LINES[1], LINES[0]] + LINES[2:]))
    assert (err.dimension, err.problem) == ("ratio", "out_of_order")


def test_parse_error_names_dimension_without_header():
    err = _error("\n".join(LINES).replace("(5) Subject Pose and Action Details:", ""))
    assert (err.dimension, err.problem) == ("pose", "no_header")


def test_parse_error_on_last_dimension_missing_and_duplicates():
    assert _error("\n".join(LINES[:6])).dimension == "color"
    assert _error("\n".join(LINES + [LINES[2]])).problem == "duplicate"


def test_strict_parse_rejects_stray_text_lenient_parse_ignores_it():
    text = "Here is my plan:\n" + PLAN.render() + "\nHope it helps."
    assert _error(text).problem == "stray_text"
    assert ActionPlan.parse(text, strict=False) == PLAN


def test_format_reward_is_one_only_for_complete_ordered_plans():
    assert format_reward(PLAN.render()) == 1.0
    assert format_reward("\n".join(LINES[:6])) == 0.0
    assert format_reward("\n".join(reversed(LINES))) == 0.0
    assert format_reward(PLAN.render().replace("<Camera>", "<Position>", 1)) == 0.0
    assert format_reward("") == 0.0
    # empty text inside a block is still a well-formed plan
    assert format_reward(ActionPlan().render()) == 1.0


def test_dict_round_trip_and_missing_key():
    assert ActionPlan.from_dict(PLAN.to_dict()) == PLAN
    d = PLAN.to_dict()
    del d["pose"]
    with pytest.raises(PlanFormatError, match="pose"):
        ActionPlan.from_dict(d)


def test_render_refuses_tags_inside_text():
    with pytest.raises(PlanFormatError, match="ratio"):
        PLAN.replace(ratio="crop </Ratio> more").render()


def test_extract_dimensions_reads_what_it_can():
    broken = "\n".join(LINES[:3] + ["<Position>no header here</Position>", "<Pose>(5) Subject Pose"])
    got = extract_dimensions(broken)
    assert got["ratio"] == PLAN.ratio and got["camera"] == PLAN.camera
    assert got["position"] == "no header here"
    assert got["pose"] is None and got["color"] is None


def test_thinker_instruction_default_and_override():
    text = thinker_instruction()
    assert text == THINKER_INSTRUCTION
    assert "identity" in text and "not there" in text
    assert all(d.label in text for d in DIMENSIONS)
    assert thinker_instruction("Fix it.") == "Fix it."
    assert "<Color>(7)" in thinker_instruction("Fix it:\n{format}")
    parts = thinker_messages()[0]["content"]
    assert parts[0] == {"type": "image"} and parts[1]["text"] == THINKER_INSTRUCTION


def test_add_plan_tokens_adds_the_fourteen_tags_as_non_special_tokens():
    class Tok:
        def add_tokens(self, tokens, special_tokens=False):
            self.got = (tokens, special_tokens)
            return len(tokens)

    tok = Tok()
    assert add_plan_tokens(tok) == 14
    assert tok.got == (list(SPECIAL_TOKENS), False)


def test_tags_are_single_tokens_that_survive_decoding(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["thinker"])
    add_plan_tokens(tok)
    ids = tok(PLAN.render())["input_ids"]
    assert tok.convert_ids_to_tokens(ids[0]) == "<Ratio>"
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) == 1 for t in SPECIAL_TOKENS)
    assert format_reward(tok.decode(ids, skip_special_tokens=True)) == 1.0

"""The tiny offline models: built without network, small, deterministic, and
usable through the same loading and prompting code as the real models."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aesformer import tiny
from aesformer.models import (ModelNotFoundError, add_plan_tokens, chat_inputs, generation_prompt_inputs,
                              load_vlm, resolve_model, score_token_ids)

pytestmark = pytest.mark.timeout(300)


def _mb(path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def _photo(size=(128, 128)):
    from aesformer.samples import sample_photos

    return sample_photos(1)[0][1].resize(size)


@pytest.fixture(scope="module")
def thinker(tiny_models):
    return load_vlm(tiny_models["thinker"])


@pytest.fixture(scope="module")
def judge(tiny_models):
    return load_vlm(tiny_models["judge"])


# -- building ----------------------------------------------------------------

def test_every_model_is_built_offline_in_the_standard_layout_under_30_mb(tiny_models):
    assert set(tiny_models) == {"tokenizer", "thinker", "judge", "editor", "whisper"}
    for key in tiny.MODEL_KEYS:
        assert _mb(tiny_models[key]) < 30, key
        assert json.loads((Path(tiny_models[key]) / "tiny.json").read_text())["tiny_version"] == tiny.TINY_VERSION
    assert (Path(tiny_models["thinker"]) / "config.json").exists()
    assert (Path(tiny_models["editor"]) / "model_index.json").exists()
    # the cache path carries the recipe version and the seed
    assert Path(tiny_models["thinker"]).parent.name == f"tiny-{tiny.TINY_VERSION}-seed0"


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tiny_models, tmp_path):
    from safetensors.torch import load_file

    rebuilt = tiny.build_tiny_models(tmp_path, seed=0)
    for key in tiny.MODEL_KEYS:
        files = sorted(Path(rebuilt[key]).rglob("*.safetensors"))
        assert files, key
        for f in files:
            a = load_file(f)
            b = load_file(Path(tiny_models[key]) / f.relative_to(rebuilt[key]))
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a), f
    other, _ = tiny._thinker(tiny.build_qwen_tokenizer(), seed=1)
    same = load_file(Path(tiny_models["thinker"]) / "model.safetensors")
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(other.state_dict()[name], same[name])


def test_a_crash_while_building_leaves_no_model_folder(tmp_path, monkeypatch):
    def broken(seed):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "_whisper", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny.build_tiny_models(tmp_path, which=["whisper"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]


def test_make_tiny_job_writes_the_chosen_models(tmp_path):
    from aesformer.jobs.make_tiny import main

    out = main([f"output={tmp_path}", "which=[whisper]"])
    assert set(out["paths"]) == {"tokenizer", "whisper"}
    assert out["size_mb"]["whisper"] < 30
    assert (tmp_path / "config.yaml").exists()


# -- tokenizer ---------------------------------------------------------------

def test_score_digits_are_single_tokens_alone_after_a_space_and_after_the_assistant_header(thinker):
    _, processor = thinker
    tok = processor.tokenizer
    ids = score_token_ids(tok)
    assert len(set(ids)) == 6
    for digit, i in zip("012345", ids):
        assert tok.encode(digit, add_special_tokens=False) == [i]
        assert tok.encode(" " + digit, add_special_tokens=False)[-1] == i
        assert tok.encode("<|im_start|>assistant\n" + digit, add_special_tokens=False)[-1] == i


def test_qwen_special_tokens_and_chat_template(thinker):
    _, processor = thinker
    tok = processor.tokenizer
    for t in tiny.QWEN_SPECIAL:
        assert tok.encode(t, add_special_tokens=False) == [tok.convert_tokens_to_ids(t)]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Frame it."}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Frame it.<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_add_plan_tokens_round_trips_a_rendered_plan(tiny_models):
    from aesformer.actions import SPECIAL_TOKENS, ActionPlan

    model, processor = load_vlm(tiny_models["thinker"])
    before = len(processor.tokenizer)
    assert add_plan_tokens(model, processor) == 14
    assert len(processor.tokenizer) == before + 14
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows >= before + 14 and rows % 64 == 0
    assert model.get_output_embeddings().weight.shape[0] == rows
    assert add_plan_tokens(model, processor) == 0
    tok = processor.tokenizer
    for t in SPECIAL_TOKENS:
        assert len(tok.encode(t, add_special_tokens=False)) == 1
    plan = ActionPlan(ratio="Keep 4:3.", composition="Crop closer.", camera="Lower the camera.",
                      position="Left third.", pose="Turn the shoulders.", focus="Blur the background.",
                      color="Warm the light.")
    text = plan.render()
    decoded = tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=True)
    assert decoded == text
    assert ActionPlan.parse(decoded) == plan


# -- vision-language models ----------------------------------------------------

def test_thinker_generates_50_tokens_from_a_photo_and_an_instruction(thinker):
    model, processor = thinker
    inputs = generation_prompt_inputs(processor, [_photo()], "Write a plan.")
    # patch 16, merge 2: a 128x128 photo is 4x4 = 16 vision tokens
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 16
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=50, min_new_tokens=50, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 50


def test_batched_prompts_are_left_padded(thinker):
    model, processor = thinker
    inputs = generation_prompt_inputs(processor, [_photo((128, 128)), _photo((64, 64))],
                                      ["Write a plan.", "Write a plan for this small photo, please."])
    mask = inputs["attention_mask"]
    assert mask[:, -1].tolist() == [1, 1]
    assert mask[0, 0] == 0 or mask[1, 0] == 0
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2


def test_chat_inputs_puts_the_loss_on_the_response_only(thinker):
    model, processor = thinker
    response = "Crop to 4:3 and lower the camera."
    inputs = chat_inputs(processor, _photo(), "Write a plan.", response=response)
    ids, labels = inputs["input_ids"][0], inputs["labels"][0]
    trained = ids[labels != -100]
    tok = processor.tokenizer
    assert tok.decode(trained) == response + "<|im_end|>"
    assert (labels[: len(ids) - len(trained) - 1] == -100).all()  # prompt (and the final newline) masked
    with torch.no_grad():
        loss = model(**inputs).loss
    assert torch.isfinite(loss) and loss.item() > 0


def test_judge_scores_from_first_position_logits_over_the_digits(judge):
    model, processor = judge
    inputs = generation_prompt_inputs(processor, [_photo()], "Rate the plan from 0 to 5.")
    assert processor.tokenizer.decode(inputs["input_ids"][0]).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1, score_token_ids(processor)]
    probs = logits.softmax(-1)
    expected = (probs * torch.arange(6)).sum(-1)
    assert probs.shape == (1, 6) and torch.allclose(probs.sum(), torch.tensor(1.0))
    assert 0.0 <= expected.item() <= 5.0


def test_text_only_prompts_for_the_judge(judge):
    model, processor = judge
    inputs = generation_prompt_inputs(processor, None, ["Plan A vs plan B: score 0-5.", "Score 0-5."])
    assert "pixel_values" not in inputs and inputs["attention_mask"][:, -1].tolist() == [1, 1]
    labelled = chat_inputs(processor, None, "Score 0-5.", response="4")
    assert processor.tokenizer.decode(labelled["input_ids"][0][labelled["labels"][0] != -100]) == "4<|im_end|>"
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


# -- editor and speech ---------------------------------------------------------

def test_editor_pipeline_edits_a_64px_photo_in_two_steps(tiny_models, monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_models["editor"])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.use_dynamic_shifting
    # The pipeline resizes the photo to ~1024x1024 for the VAE and ~384x384 for
    # the text encoder whatever its size; shrink those areas for the CPU.
    monkeypatch.setattr(edit_plus, "VAE_IMAGE_SIZE", 64 * 64)
    monkeypatch.setattr(edit_plus, "CONDITION_IMAGE_SIZE", 64 * 64)
    out = pipe(image=_photo((64, 64)), prompt="Crop closer.", negative_prompt=" ", true_cfg_scale=4.0,
               height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (64, 64)


def test_editor_text_encoder_prefix_is_the_64_tokens_the_pipeline_drops(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(tiny_models["editor"]) / "tokenizer")
    prefix = "<|im_start|>system\n" + tiny._EDIT_SYSTEM + "<|im_end|>\n<|im_start|>user\n"
    assert len(tok.encode(prefix, add_special_tokens=False)) == 64


def test_whisper_transcribes_one_second_of_audio(tiny_models):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(tiny_models["whisper"]).eval()
    processor = WhisperProcessor.from_pretrained(tiny_models["whisper"])
    for t in ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>", "<|0.00|>", "<|30.00|>"):
        assert processor.tokenizer.convert_tokens_to_ids(t) != processor.tokenizer.unk_token_id
    wave = np.sin(np.linspace(0, 2 * np.pi * 440, 16000)).astype(np.float32)
    features = processor(wave, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(features, language="en", task="transcribe", max_new_tokens=10)
    assert isinstance(processor.batch_decode(ids, skip_special_tokens=True)[0], str)


# -- names → paths ---------------------------------------------------------------

def test_resolve_model_maps_tiny_names_paths_and_hub_ids(tiny_models, tmp_path):
    assert resolve_model("tiny:thinker") == tiny_models["thinker"]
    assert resolve_model(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_model("Qwen/Qwen3-VL-8B-Instruct") == "Qwen/Qwen3-VL-8B-Instruct"
    with pytest.raises(ModelNotFoundError, match=r"/no/such/model.*models\.judge"):
        resolve_model("/no/such/model", config_key="models.judge")
    with pytest.raises(ModelNotFoundError, match="tiny:thinker"):
        resolve_model("tiny:thinkr")

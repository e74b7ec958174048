"""The editor wrapper around diffusers' QwenImageEditPlusPipeline (tiny editor, CPU)."""
import numpy as np
import pytest
import torch

from aesformer import editor as E
from aesformer.samples import sample_photo

CONTROL_AREA, CONDITION_AREA = 64 * 64, 56 * 56


@pytest.fixture(scope="module")
def ed(tiny_models):
    return E.Editor.load(tiny_models["editor"], control_area=CONTROL_AREA, condition_area=CONDITION_AREA,
                         device="cpu", name="tiny:editor")


@pytest.fixture(scope="module")
def photo():
    return sample_photo("chelsea")  # 451x300 real photograph


def test_calculate_dimensions_keeps_area_and_aspect_on_a_32_grid():
    assert E.calculate_dimensions(1024 * 1024, 1.0) == (1024, 1024)
    assert E.calculate_dimensions(1024 * 1024, 4 / 3) == (1184, 896)   # 1182.4 x 886.8 rounded to 32
    assert E.calculate_dimensions(64 * 64, 451 / 300) == (64, 64)   # 78.5 x 52.2: coarse at tiny areas
    assert E.calculate_dimensions(96 * 96, 451 / 300) == (128, 64)


def test_dropped_prefix_is_computed_from_the_template(ed):
    pipe = ed.pipe
    tok, template = pipe.tokenizer, pipe.prompt_template_encode
    n = pipe.prompt_template_encode_start_idx
    full = tok(template.format("Picture 1: <|vision_start|><|image_pad|><|vision_end|>Crop it"),
               add_special_tokens=False)["input_ids"]
    assert n == E.template_prefix_length(tok, template)
    # the dropped tokens are exactly the template's prefix; what is kept starts at the prompt
    assert full[:n] == tok(template.split("{}")[0], add_special_tokens=False)["input_ids"]
    assert tok.decode(full[n:]).startswith("Picture 1:")
    # a shorter system prompt gives a shorter prefix: nothing is hard-coded
    short = "<|im_start|>system\nEdit.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    assert E.template_prefix_length(tok, short) < n


def test_control_and_condition_sizes_follow_the_configured_areas(ed, photo):
    assert ed.control_size(photo) == (64, 64)       # about 64x64 pixels, on the 32-pixel grid
    assert ed.condition_size(photo) == (64, 32)      # about 56x56
    latents = ed.encode_control(photo)
    assert latents.shape == (1, 16, 1, 8, 8)         # VAE /8
    embeds, mask = ed.encode_prompt(photo, "Crop the frame to 4:3")
    assert embeds.shape[0] == 1 and embeds.shape[2] == ed.pipe.text_encoder.config.text_config.hidden_size


def test_edit_returns_the_requested_size_and_is_seeded(ed, photo):
    a = ed.edit(photo, "Straighten the horizon", seed=3, steps=2, height=96, width=128)
    b = ed.edit(photo, "Straighten the horizon", seed=3, steps=2, height=96, width=128)
    c = ed.edit(photo, "Straighten the horizon", seed=4, steps=2, height=96, width=128)
    assert a.size == (128, 96)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    # no size asked: the control area at the photo's aspect
    assert ed.edit(photo, "x", seed=0, steps=2).size == (64, 64)


def test_transformer_forward_is_the_pipelines_layout(ed, photo):
    """The first Euler step from pure noise, computed with the cache's
    ingredients and transformer_forward, equals the pipeline's own step: the
    cache and the training forward feed the transformer what inference does."""
    pipe, prompt, (w, h) = ed.pipe, "Move the subject to the left third", (64, 64)
    seen = {}

    def grab(p, i, t, kw):
        seen.setdefault(i, kw["latents"].clone())
        return kw

    with E.pipeline_areas(ed.control_area, ed.condition_area):
        pipe(image=photo, prompt=prompt, height=h, width=w, num_inference_steps=2, true_cfg_scale=1.0,
             generator=torch.Generator().manual_seed(7), output_type="latent", callback_on_step_end=grab)
    sigma0, sigma1 = pipe.scheduler.sigmas[:2].tolist()
    noise = torch.randn((1, 1, 16, h // 8, w // 8), generator=torch.Generator().manual_seed(7))
    noise = E.pack_latents(noise.transpose(1, 2))
    embeds, mask = ed.encode_prompt(photo, prompt)
    control = ed.encode_control(photo)
    with torch.no_grad():
        v = E.transformer_forward(pipe.transformer, noise, E.pack_latents(control), (h // 8, w // 8),
                                  tuple(control.shape[-2:]), embeds, mask, torch.tensor([sigma0]))
    assert sigma0 == 1.0
    assert torch.allclose(seen[0], noise + (sigma1 - sigma0) * v, atol=1e-5)


def test_one_step_is_refused(ed, photo):
    with pytest.raises(ValueError, match="at least 2"):
        ed.edit(photo, "x", steps=1)


def test_missing_model_or_lora_paths_fail_naming_them(ed, tmp_path):
    with pytest.raises(FileNotFoundError, match="/nope/editor"):
        E.Editor.load("/nope/editor")
    with pytest.raises(FileNotFoundError, match="no-lora"):
        ed.load_lora(str(tmp_path / "no-lora"))


def test_pack_and_unpack_are_inverse():
    x = torch.randn(2, 16, 1, 6, 8)
    tokens = E.pack_latents(x)
    assert tokens.shape == (2, 12, 64)
    assert torch.equal(E.unpack_latents(tokens, 6, 8), x)


def test_lora_records_its_base_and_refuses_another(ed, tiny_models, tmp_path):
    from diffusers import QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel.from_pretrained(tiny_models["editor"], subfolder="transformer")
    transformer.add_adapter(E.lora_config(rank=4, alpha=1.0))
    E.save_lora(transformer, tmp_path / "lora", base_model="tiny:editor", card="# test LoRA\n")
    assert (tmp_path / "lora" / E.LORA_WEIGHTS_FILE).exists()

    # another architecture (one block fewer) under another name
    cfg = dict(transformer.config)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["num_layers"] = 1
    other = E.Editor(ed.pipe.__class__(**{**ed.pipe.components, "transformer": QwenImageTransformer2DModel(**cfg)}),
                     name="other-editor", control_area=CONTROL_AREA, condition_area=CONDITION_AREA)
    with pytest.raises(E.LoraBaseMismatch) as err:
        other.load_lora(str(tmp_path / "lora"))
    assert "tiny:editor" in str(err.value) and "other-editor" in str(err.value)

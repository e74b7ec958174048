"""Tiny, randomly initialised stand-ins for the real models, built offline.

The development machines cannot download weights, so the tiny profile builds
models of the *same classes* as the real ones, saved in the standard
transformers / diffusers layout, and loaded by the same ``from_pretrained``
code path:

- ``tokenizer``: a Qwen-style byte-level BPE trained here on a small built-in
  corpus about photography, with Qwen's special tokens and chat template;
  the digits "0".."5" are single tokens (as in Qwen's tokenizer).
- ``thinker``: Qwen3-VL (``Qwen3VLForConditionalGeneration`` + ``Qwen3VLProcessor``).
- ``judge``: Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration`` + processor).
- ``editor``: a Qwen-Image-Edit diffusers pipeline (``QwenImageEditPlusPipeline``).
- ``whisper``: ``WhisperForConditionalGeneration`` + ``WhisperProcessor``.

Every model is built under ``torch.manual_seed(seed)``, so the same seed gives
identical weights; each is a few MB. A model folder appears only once it is
complete (built in a temporary folder, then renamed).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Iterable

from aesformer.atomic import write_dir

log = logging.getLogger(__name__)

# Bump when the recipe changes: the cache path carries it, so old caches are
# simply not found and the models are rebuilt.
TINY_VERSION = "v1"
MODEL_KEYS = ("thinker", "judge", "editor", "whisper")
DEFAULT_CACHE = "~/.cache/aesformer"

# ---------------------------------------------------------------------------
# Sizes. Small enough that a forward + 50-token generate on a 128x128 photo
# takes a fraction of a second on one CPU thread.
# ---------------------------------------------------------------------------
BPE_VOCAB = 3000                    # target size of the trained BPE (before added tokens)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
VISION_HIDDEN = 64
# Qwen3-VL: patch 16, merge 2 -> one vision token per 32x32 pixels.
QWEN3_PATCH, QWEN3_MERGE = 16, 2
QWEN3_MIN_PIXELS, QWEN3_MAX_PIXELS = 32 * 32 * 4, 32 * 32 * 16       # 4..16 vision tokens
# Qwen2.5-VL: patch 14, merge 2 -> one vision token per 28x28 pixels.
QWEN25_PATCH, QWEN25_MERGE = 14, 2
QWEN25_MIN_PIXELS, QWEN25_MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 16     # 4..16 vision tokens

# Qwen's special tokens (the real vocabulary has them after the BPE pieces, in this order).
QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Added but not special (they stay in decoded text), as in Qwen3's tokenizer.
QWEN_ADDED = ["<tool_call>", "</tool_call>", "<think>", "</think>"]

# The text part of Qwen-Image-Edit's prompt template; in the corpus so that the
# tiny tokenizer splits it much like Qwen's does (the pipeline drops a fixed
# 64-token prefix of the encoder's output).
_EDIT_SYSTEM = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate."
)

# ---------------------------------------------------------------------------
# Corpus: short, plain sentences about taking and editing photographs.
# ---------------------------------------------------------------------------
_PARAGRAPHS = [
    "(1) Aspect Ratio: (2) Framing and Composition: (3) Camera Position and Viewpoint: "
    "(4) Subject Position: (5) Subject Pose and Action Details: (6) Depth of Field and Focus Control: "
    "(7) Color and Lighting Adjustment:",
    "Ratio Composition Camera Position Pose Focus Color",
    _EDIT_SYSTEM,
    "You are a helpful assistant. Look at the photo and write a plan of editing actions along seven "
    "photographic dimensions, from global to local. Answer with a single digit from 0 to 5.",
    "Score how well the plan matches the reference plan. Score whether the plan is actionable, structural, "
    "likely to give a visible gain, and only touches what is in the photo. A plan that adds new objects or "
    "people scores zero.",
    "Crop the frame to a 4:3 aspect ratio and keep the subject on the left third line. Use a 3:2 or 16:9 "
    "ratio for wide landscapes and a 1:1 square for portraits on social media. A vertical 9:16 frame suits "
    "a standing person.",
    "Move the camera lower and shoot from waist height so the horizon sits on the lower third. Step back "
    "to include the whole body, or step closer for a tight head and shoulders portrait.",
    "The subject should turn the shoulders slightly away from the camera, relax the arms, lift the chin "
    "and look past the lens. Shift the weight onto the back foot and bend the front knee.",
    "Open the aperture to f/1.8 for a shallow depth of field, blur the busy background and keep the focus "
    "on the nearest eye. Close down to f/8 for a sharp landscape from the foreground to the mountains.",
    "Warm the white balance, lift the shadows, lower the highlights, add a little contrast and saturation, "
    "and keep the skin tones natural. Golden hour light is soft and warm; midday sun is harsh and blue.",
    "Leading lines, symmetry, negative space, the rule of thirds, the golden ratio, diagonal lines and a "
    "clean background all help the viewer find the subject. Remove distracting objects at the edges.",
    "Straighten the tilted horizon, correct the vertical lines of the building, and level the camera. A "
    "high angle makes a person look small; a low angle makes them look tall and strong.",
    "Place the subject off centre, leave room in the direction they face or walk, and do not cut limbs at "
    "the joints. Fill the frame with the face, or show the person small in a wide scene.",
    "Backlight creates a rim of light in the hair; side light shows texture; front light flattens the face. "
    "Use a reflector to fill the shadows, or turn the person towards the window.",
    "The poor photo is cluttered and tilted; the good photo is level, simple, bright and well framed. "
    "Keep the same person, the same scene and the same event; do not add anything new.",
    "Teacher: now watch what happens when I crouch down. See how the sky fills the background? That is "
    "much cleaner. Okay, turn a little, hands in the pockets, great, hold it there.",
]
_SUBJECTS = ["the subject", "the model", "the woman", "the man", "the child", "the couple", "the dog",
             "the cat", "the building", "the tree", "the bride", "the runner", "the dancer", "the portrait",
             "the face", "the horizon", "the street", "the flower", "the car", "the lake", "the sunset"]
_ACTIONS = ["crop", "reframe", "rotate", "straighten", "move", "shift", "center", "lower", "raise",
            "tilt", "zoom", "blur", "sharpen", "brighten", "darken", "warm", "cool", "soften", "turn",
            "place", "expand", "tighten", "simplify", "balance", "align", "isolate", "highlight"]
_OBJECTS = ["frame", "camera", "lens", "background", "foreground", "shadow", "highlight", "exposure",
            "contrast", "saturation", "colour", "color", "tone", "light", "sky", "edge", "corner",
            "angle", "viewpoint", "pose", "gesture", "posture", "expression", "gaze", "hand", "arm",
            "leg", "shoulder", "head", "hair", "eye", "focus", "bokeh", "aperture", "shutter", "iso",
            "tripod", "flash", "reflector", "window", "silhouette", "texture", "pattern", "symmetry"]
_MODIFIERS = ["slightly", "gently", "strongly", "a little", "much more", "towards the left",
              "towards the right", "upwards", "downwards", "to the centre", "along the third line",
              "at eye level", "from a low angle", "from a high angle", "in soft light", "in warm light",
              "with a shallow depth of field", "with more headroom", "with less empty space",
              "so the lines converge", "so the subject stands out", "for a cleaner composition"]

_GLOSSARY = """
photograph photography photographer snapshot picture image shot scene frame framing reframe crop cropping
composition composed compose layout arrangement balance balanced imbalance harmony rhythm repetition contrast
camera cameras lens lenses prime zoom telephoto wide-angle fisheye macro mirrorless viewfinder sensor pixel
pixels megapixel resolution exposure overexposed underexposed histogram metering bracketing aperture shutter
speed iso noise grain sharpness sharp soft blurry motion blur freeze panning stabiliser tripod monopod gimbal
subject subjects person people portrait portraits headshot selfie family friends crowd group pair couple
bride groom child children baby toddler teenager adult elderly grandmother grandfather mother father sister
brother athlete dancer runner skater cyclist surfer climber musician singer chef student tourist traveller
pose posing posture stance gesture expression smile laugh frown glance gaze stare wink profile silhouette
standing sitting kneeling crouching leaning walking running jumping dancing stretching reaching holding
pointing waving hugging looking facing turning twisting bending lifting lowering raising tilting nodding
head chin jaw neck shoulder shoulders chest torso waist hips elbow wrist fingers palm knee knees ankle feet
foot toes eyes eyebrows forehead cheek cheeks lips mouth teeth nose ears hair beard fringe skin complexion
position placement centred centered offset left right top bottom upper lower middle corner edge border
margin headroom lead room breathing space negative empty cluttered busy clean minimal simple tidy messy
viewpoint perspective angle eye-level overhead bird's-eye worm's-eye aerial drone ground low high tilt
level horizon straighten rotate rotation skew keystone distortion vertical horizontal diagonal converge
depth field focus focal plane bokeh background foreground midground layer layers separation isolation
autofocus manual focusing refocus depth-of-field shallow deep hyperfocal distance near far closer further
colour color colours colors hue hues saturation saturated desaturated vibrance vivid muted pastel monochrome
black white grey gray sepia red orange yellow green blue cyan magenta purple pink brown gold golden silver
warm cool neutral tint temperature kelvin balance white-balance cast correction grading grade toning split
lighting light lights lit bright brighter brightness dark darker darkness dim shadow shadows highlight
highlights midtones tone tones tonal contrast dynamic range clipping blown crushed fill key rim hair back
side front top under ambient natural artificial daylight sunlight sunrise sunset dusk dawn twilight night
overcast cloudy sunny rainy foggy misty snowy hazy window lamp flash strobe softbox umbrella reflector
diffuser bounce hard harsh soft gentle dramatic moody cinematic airy fresh crisp glow halo flare lens-flare
indoor outdoor studio street city urban village countryside beach sea ocean lake river waterfall forest
woods park garden field meadow mountain mountains hill valley desert snow ice sky clouds sun moon stars
building buildings architecture bridge tower church temple castle house home room kitchen cafe restaurant
market station train bus car bicycle boat road path stairs door wall fence bench table chair sofa bed
flower flowers tree trees leaves grass plant plants rock rocks sand wave waves reflection reflections water
animal animals dog dogs cat cats bird birds horse horses fish insect butterfly pet pets wildlife zoo farm
food dish plate cup coffee tea cake bread fruit apple lemon orange drink glass bottle product still life
tutorial lesson lecture video clip segment frame frames second seconds minute minutes transcript audio
teacher student instructor viewer audience channel episode before after comparison example mistake fix
improve improvement better worse best poor good great nice beautiful pleasing attractive aesthetic
aesthetics taste style mood feeling story emotion impact attention focal point interest visual weight
rule thirds golden ratio spiral triangle symmetry asymmetry pattern texture shape shapes line lines curve
curves circle square rectangle landscape portrait orientation vertical panoramic panorama square format
aspect ratio ratios wide tall narrow format formats print prints screen phone smartphone social media
edit editing editor edits retouch retouching adjust adjustment adjustments enhance enhancement restore
reconstruct reconstruction remove removal erase clone heal replace keep preserve maintain identity same
consistent consistency natural realistic plausible visible gain actionable structural global local order
step steps plan plans action actions dimension dimensions instruction instructions reference alignment
creativity score scores scoring judge judgement reward rewards answer answers question questions reason
first second third fourth fifth sixth seventh one two three four five six seven eight nine ten zero
slightly gently strongly moderately subtly clearly noticeably carefully quickly slowly simply naturally
should would could might must can will may please also then next finally instead rather only just even
about above across against along among around behind below beneath beside between beyond inside outside
through toward towards under within without onto into over from with for and but or nor so yet because
while when where which who whom whose what why how this that these those there here each every both either
"""


def photography_corpus() -> list[str]:
    """The built-in English training text for the tiny tokenizer (deterministic)."""
    lines = list(_PARAGRAPHS)
    # Frequent strings become whole tokens, as in a real tokenizer: the chat
    # roles, and Qwen-Image-Edit's system prompt (then its 56 pieces + 8
    # ChatML tokens are exactly the 64-token prefix the pipeline drops).
    lines += ["system", "user", "assistant", _EDIT_SYSTEM] * 40
    words = _GLOSSARY.split()
    lines += [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    lines += [" ".join(w.capitalize() for w in words[i:i + 12]) + "." for i in range(0, len(words), 12)]
    # A deterministic walk over the word lists, so every word appears in
    # several contexts (the BPE learns whole-word pieces for them).
    for i, subject in enumerate(_SUBJECTS):
        for j, action in enumerate(_ACTIONS):
            obj = _OBJECTS[(i * 7 + j * 3) % len(_OBJECTS)]
            mod = _MODIFIERS[(i + j * 5) % len(_MODIFIERS)]
            lines.append(f"{action.capitalize()} the {obj} of {subject} {mod}.")
    for k in range(200):
        lines.append(f"Step {k % 6}: score {k % 6} of 5, {k} photos, {k / 10:.1f} seconds, ISO {100 * (k % 32 + 1)}.")
    return lines


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------
def chat_template(default_system: str | None = None) -> str:
    """Qwen's ChatML template with image/video content parts.

    ``default_system`` is inserted when the conversation has no system turn
    (Qwen2.5-VL does this with "You are a helpful assistant."; Qwen3-VL does not).
    """
    head = ""
    if default_system:
        head = (
            "{%- if messages[0]['role'] != 'system' -%}"
            "{{- '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' -}}"
            "{%- endif -%}"
        )
    return head + (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}"
        "{{- message['content'] -}}"
        "{%- else -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
        "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
        "{%- elif part['type'] == 'video' or 'video' in part -%}"
        "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
        "{%- elif 'text' in part -%}"
        "{{- part['text'] -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '<|im_start|>assistant\\n' -}}"
        "{%- endif -%}"
    )


def _train_bpe(corpus: Iterable[str], vocab_size: int, specials: list[str]):
    """Byte-level BPE with Qwen's pre-tokenisation (digits split one by one)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=specials,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return tok


def build_qwen_tokenizer(default_system: str | None = None):
    """A ``Qwen2Tokenizer`` (tokenizers backend) trained on the photography corpus."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    # <|endoftext|> is trained in as id 0 so the BPE never merges it; the other
    # special tokens follow the BPE pieces, as in Qwen's vocabulary.
    bpe = _train_bpe(photography_corpus(), BPE_VOCAB, ["<|endoftext|>"])
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, errors="replace",
                               model_max_length=32768, clean_up_tokenization_spaces=False)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL[1:]],
                         special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED])
    tokenizer.eos_token = "<|im_end|>"      # the end of an assistant turn, as in Qwen's instruct models
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = chat_template(default_system)
    return tokenizer


def _check_digits(tokenizer) -> None:
    for d in "012345":
        for text in (d, " " + d, "\n" + d):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids[-1] != tokenizer.convert_tokens_to_ids(d):
                raise AssertionError(f"digit {d!r} is not one token in {text!r}: {ids}")


# ---------------------------------------------------------------------------
# Vision-language models
# ---------------------------------------------------------------------------
def _special_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    return dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos=ids["<|im_end|>"], endoftext=ids["<|endoftext|>"],
    )


def _generation_config(tokenizer):
    from transformers import GenerationConfig

    ids = _special_ids(tokenizer)
    return GenerationConfig(bos_token_id=ids["endoftext"], eos_token_id=[ids["eos"], ids["endoftext"]],
                            pad_token_id=ids["endoftext"], do_sample=False)


def _thinker(tokenizer, seed: int):
    """Tiny Qwen3-VL with its processor (image + video processors)."""
    import torch
    from transformers import (Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLProcessor, Qwen3VLVideoProcessor)

    ids = _special_ids(tokenizer)
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), **TEXT, hidden_act="silu", max_position_embeddings=4096,
            rms_norm_eps=1e-6, bos_token_id=ids["endoftext"], eos_token_id=ids["eos"],
            pad_token_id=ids["endoftext"], tie_word_embeddings=False,
            # head_dim 16 -> 8 rotary pairs, split T/H/W as 24:20:20 of Qwen3-VL's 64.
            rope_parameters=dict(rope_type="default", rope_theta=5_000_000.0,
                                 mrope_section=[4, 2, 2], mrope_interleaved=True),
        ),
        vision_config=dict(
            depth=2, hidden_size=VISION_HIDDEN, intermediate_size=128, num_heads=4,
            patch_size=QWEN3_PATCH, spatial_merge_size=QWEN3_MERGE, temporal_patch_size=2,
            out_hidden_size=TEXT["hidden_size"], num_position_embeddings=64,  # an 8x8 learned grid
            deepstack_visual_indexes=[0],
        ),
        image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.generation_config = _generation_config(tokenizer)
    pixels = dict(patch_size=QWEN3_PATCH, merge_size=QWEN3_MERGE, temporal_patch_size=2,
                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size={"shortest_edge": QWEN3_MIN_PIXELS, "longest_edge": QWEN3_MAX_PIXELS}, **pixels),
        video_processor=Qwen3VLVideoProcessor(
            size={"shortest_edge": QWEN3_MIN_PIXELS, "longest_edge": QWEN3_MAX_PIXELS * 4},
            fps=2, min_frames=2, max_frames=16, **pixels),
        tokenizer=tokenizer, chat_template=tokenizer.chat_template,
    )
    return model, processor


def _qwen25_vl(tokenizer, seed: int):
    """Tiny Qwen2.5-VL and the pieces of its processor (judge, editor text encoder)."""
    import torch
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLVideoProcessor)

    ids = _special_ids(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), **TEXT, hidden_act="silu", max_position_embeddings=4096,
            rms_norm_eps=1e-6, bos_token_id=ids["endoftext"], eos_token_id=ids["eos"],
            pad_token_id=ids["endoftext"], tie_word_embeddings=False,
            # mrope_section must sum to head_dim/2 = 8 (Qwen2.5-VL: 16:24:24 of 64).
            rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0, mrope_section=[2, 3, 3]),
        ),
        vision_config=dict(
            depth=2, hidden_size=VISION_HIDDEN, intermediate_size=128, num_heads=4,
            patch_size=QWEN25_PATCH, spatial_merge_size=QWEN25_MERGE, temporal_patch_size=2,
            out_hidden_size=TEXT["hidden_size"], window_size=56, fullatt_block_indexes=[1],
        ),
        image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config = _generation_config(tokenizer)
    clip = dict(patch_size=QWEN25_PATCH, merge_size=QWEN25_MERGE, temporal_patch_size=2,
                image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": QWEN25_MIN_PIXELS, "longest_edge": QWEN25_MAX_PIXELS}, **clip)
    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": QWEN25_MIN_PIXELS, "longest_edge": QWEN25_MAX_PIXELS * 4}, **clip)
    return model, image_processor, video_processor


def _judge(tokenizer, seed: int):
    from transformers import Qwen2_5_VLProcessor

    model, image_processor, video_processor = _qwen25_vl(tokenizer, seed)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=video_processor, chat_template=tokenizer.chat_template)
    return model, processor


# ---------------------------------------------------------------------------
# Image editor: a Qwen-Image-Edit pipeline
# ---------------------------------------------------------------------------
# Qwen-Image's scheduler: flow matching with a resolution-dependent
# ("dynamic") exponential shift of the sigmas.
QWEN_IMAGE_SCHEDULER = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
    base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    invert_sigmas=False, stochastic_sampling=False,
)
EDITOR_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
                          num_attention_heads=2, guidance_embeds=False, axes_dims_rope=(8, 12, 12))
EDITOR_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                  temperal_downsample=[False, True, True])


def _editor(tokenizer, seed: int):
    """Tiny QwenImageEditPlusPipeline: MMDiT, Qwen-Image VAE, Qwen2.5-VL text encoder."""
    import inspect

    import torch
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2VLProcessor

    text_encoder, image_processor, video_processor = _qwen25_vl(tokenizer, seed)
    # Qwen-Image-Edit-2511 conditions the reference-image tokens on t=0 ("zero_cond_t").
    extra = {}
    if "zero_cond_t" in inspect.signature(QwenImageTransformer2DModel.__init__).parameters:
        extra["zero_cond_t"] = True
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(joint_attention_dim=TEXT["hidden_size"], **EDITOR_TRANSFORMER, **extra)
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(**EDITOR_VAE)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=tokenizer.chat_template)
    pipe = QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER), vae=vae.eval(),
        text_encoder=text_encoder, tokenizer=tokenizer, processor=processor, transformer=transformer.eval(),
    )
    return pipe


# ---------------------------------------------------------------------------
# Speech recognition: Whisper
# ---------------------------------------------------------------------------
WHISPER = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
               max_source_positions=1500, max_target_positions=448)
WHISPER_BPE_VOCAB = 2000


def build_whisper_tokenizer():
    """A ``WhisperTokenizer`` (GPT-2 byte-level BPE) with Whisper's special and timestamp tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import WhisperTokenizer
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=WHISPER_BPE_VOCAB, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(photography_corpus(), trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = WhisperTokenizer(vocab=state["vocab"], merges=merges, errors="replace", model_max_length=448)
    # Whisper's order: end of text, start of transcript, languages, tasks, the
    # remaining control tokens, then the 1501 timestamps <|0.00|>..<|30.00|>.
    specials = ["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{code}|>" for code in LANGUAGES]
    specials += ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                 "<|notimestamps|>"]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    tokenizer.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", special=False, normalized=False) for i in range(1501)])
    return tokenizer


def _whisper(seed: int):
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor)
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    tokenizer = build_whisper_tokenizer()
    tid = tokenizer.convert_tokens_to_ids
    eot, sot = tid("<|endoftext|>"), tid("<|startoftranscript|>")
    begin_suppress = [tid("Ġ"), eot]
    config = WhisperConfig(vocab_size=len(tokenizer), **WHISPER, pad_token_id=eot, bos_token_id=eot,
                           eos_token_id=eot, decoder_start_token_id=sot,
                           # the class default names GPT-2's ids; point it at ours
                           begin_suppress_tokens=begin_suppress, suppress_tokens=None)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, max_length=448,
        is_multilingual=True, lang_to_id={f"<|{c}|>": tid(f"<|{c}|>") for c in LANGUAGES},
        task_to_id={"transcribe": tid("<|transcribe|>"), "translate": tid("<|translate|>")},
        no_timestamps_token_id=tid("<|notimestamps|>"), prev_sot_token_id=tid("<|startofprev|>"),
        suppress_tokens=[], begin_suppress_tokens=begin_suppress, max_initial_timestamp_index=50,
        return_timestamps=False, alignment_heads=[[1, 0], [1, 1]],
    )
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=WHISPER["num_mel_bins"]),
                                 tokenizer=tokenizer)
    return model, processor


# ---------------------------------------------------------------------------
# Building and caching
# ---------------------------------------------------------------------------
def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def _manifest(path: Path, key: str, seed: int, extra: dict) -> None:
    info = {"tiny_version": TINY_VERSION, "key": key, "seed": seed, **extra}
    (path / "tiny.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def build_tiny_models(output: str | Path, seed: int = 0,
                      which: Iterable[str] = MODEL_KEYS) -> dict[str, str]:
    """Build the tiny models offline into ``output/<key>/`` (plus ``output/tokenizer/``).

    Returns ``{key: path}`` for the tokenizer and every model in ``which``.
    Same ``seed`` → identical weights.
    """
    import torch

    which = list(which)
    unknown = [k for k in which if k not in MODEL_KEYS]
    if unknown:
        raise ValueError(f"unknown tiny model(s) {unknown}; choose from {list(MODEL_KEYS)}")
    output = Path(output).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    tokenizer = build_qwen_tokenizer()
    _check_digits(tokenizer)
    judge_tokenizer = build_qwen_tokenizer(default_system="You are a helpful assistant.")
    paths = {"tokenizer": str(output / "tokenizer")}

    def save_tokenizer(tmp: Path) -> None:
        tokenizer.save_pretrained(tmp)
        _manifest(tmp, "tokenizer", seed, {"class": type(tokenizer).__name__, "vocab": len(tokenizer)})

    write_dir(output / "tokenizer", save_tokenizer)

    for key in which:
        t0 = time.perf_counter()

        def save(tmp: Path, key=key) -> None:
            if key == "thinker":
                model, processor = _thinker(tokenizer, seed)
            elif key == "judge":
                model, processor = _judge(judge_tokenizer, seed)
            elif key == "editor":
                pipe = _editor(judge_tokenizer, seed)
                pipe.save_pretrained(tmp, safe_serialization=True)
                _manifest(tmp, key, seed, {"class": type(pipe).__name__,
                                           "transformer": _public(pipe.transformer.config),
                                           "vae": _public(pipe.vae.config)})
                return
            else:
                model, processor = _whisper(seed)
            model.save_pretrained(tmp, safe_serialization=True)
            processor.save_pretrained(tmp)
            n = sum(p.numel() for p in model.parameters())
            _manifest(tmp, key, seed, {"class": type(model).__name__, "parameters": n,
                                       "processor": type(processor).__name__})

        with torch.no_grad():
            write_dir(output / key, save)
        paths[key] = str(output / key)
        log.info("tiny %s built in %.1fs (%.1f MB) at %s", key, time.perf_counter() - t0,
                 _dir_mb(output / key), output / key)
    log.info("tiny models built in %.1fs", time.perf_counter() - t_all)
    return paths


def tiny_cache_root(cache_dir: str | None = None, seed: int = 0) -> Path:
    """``<cache_dir or ~/.cache/aesformer>/tiny-<version>-seed<seed>``."""
    base = Path(cache_dir or os.environ.get("AESFORMER_CACHE") or DEFAULT_CACHE).expanduser()
    return base / f"tiny-{TINY_VERSION}-seed{seed}"


def ensure_tiny_models(cache_dir: str | None = None, seed: int = 0) -> dict[str, str]:
    """Paths of the tiny models, building (once per machine) whatever is missing.

    A file lock makes concurrent callers (test workers, Ray actors) wait for
    one build instead of racing; the recipe version in the path means a
    changed recipe is rebuilt rather than silently reused.
    """
    from filelock import FileLock

    root = tiny_cache_root(cache_dir, seed)
    keys = ("tokenizer",) + MODEL_KEYS
    paths = {k: str(root / k) for k in keys}
    if all((root / k / "tiny.json").exists() for k in keys):
        return paths
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        missing = [k for k in MODEL_KEYS if not (root / k / "tiny.json").exists()]
        if missing or not (root / "tokenizer" / "tiny.json").exists():
            log.info("building tiny models %s under %s", missing, root)
            build_tiny_models(root, seed=seed, which=missing)
    return paths

"""Image scorers behind one interface: the classical ones, LAION aesthetic v2
(tiny CLIP + random head stand-ins), the released Q-Align run by its own code
(a tiny checkpoint with code of its own stands in), Q-Align-style on the tiny
VLM, the reason a scorer is skipped; and VCMP's quality filter scoring through
the same interface, with the a40 profile naming the same learned scorers for
VCMP and evaluation."""
import json

import numpy as np
import pytest
import torch

from aesformer.samples import sample_photo
from aesformer.scorers import (ImageScorer, ScorerSpec, ScorerUnavailable, aesthetic_head, load_scorer,
                               qalign_score, scorer_from_name)

TINY_CLIP = {"embed_dim": 32, "quick_gelu": True,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 128, "width": 32, "heads": 2, "layers": 1}}


# The code a Q-Align checkpoint ships (trust_remote_code): a model class with
# score(images, task_, input_) -> 1..5. This stand-in scores brightness for
# "quality" and darkness for "aesthetics".
TINY_QALIGN_CODE = """
import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel


class TinyQAlignConfig(PretrainedConfig):
    model_type = "tiny_qalign"


class TinyQAlign(PreTrainedModel):
    config_class = TinyQAlignConfig

    def __init__(self, config):
        super().__init__(config)
        self.gain = torch.nn.Parameter(torch.tensor([4.0]))
        self.post_init()

    def _init_weights(self, module):
        pass

    def score(self, images, task_="quality", input_="image"):
        light = torch.tensor([np.asarray(im.convert("L"), dtype=np.float32).mean() / 255.0 for im in images])
        level = 1.0 + self.gain * light
        return level if task_ == "quality" else 6.0 - level
"""


@pytest.fixture(scope="module")
def tiny_qalign(tmp_path_factory):
    """A checkpoint folder with its own modelling code, as the released Q-Align's."""
    import importlib.util

    folder = tmp_path_factory.mktemp("qalign")
    (folder / "modeling_tiny_qalign.py").write_text(TINY_QALIGN_CODE)
    spec = importlib.util.spec_from_file_location("modeling_tiny_qalign", folder / "modeling_tiny_qalign.py")
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    config = code.TinyQAlignConfig(auto_map={"AutoConfig": "modeling_tiny_qalign.TinyQAlignConfig",
                                             "AutoModelForCausalLM": "modeling_tiny_qalign.TinyQAlign"})
    code.TinyQAlign(config).save_pretrained(folder)
    return str(folder)


WHITE, BLACK = (255, 255, 255), (0, 0, 0)


@pytest.fixture(scope="module")
def tiny_laion(tmp_path_factory):
    """A tiny CLIP built from an open_clip config with random weights, and a random aesthetic head."""
    import open_clip

    folder = tmp_path_factory.mktemp("laion")
    cfg = folder / "tiny-clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    clip = open_clip.create_model("tiny-clip", force_quick_gelu=True)
    torch.save(clip.state_dict(), folder / "clip.pt")
    head = aesthetic_head(TINY_CLIP["embed_dim"])
    torch.save(head.state_dict(), folder / "head.pt")
    return {"clip": str(cfg), "clip_weights": str(folder / "clip.pt"), "weights": str(folder / "head.pt"),
            "clip_model": clip, "head": head}


def test_laion_scorer_is_the_head_on_the_normalised_clip_embedding(tiny_laion):
    scorer = load_scorer(ScorerSpec(name="laion", kind="laion", clip=tiny_laion["clip"],
                                    clip_weights=tiny_laion["clip_weights"], weights=tiny_laion["weights"]))
    photos = [sample_photo("astronaut"), sample_photo("coffee")]
    got = scorer(photos)
    assert got.shape == (2,) and scorer.scale == (1.0, 10.0)
    # by hand: open_clip's own preprocessing, L2-normalised embedding, the head
    import open_clip

    _, _, pre = open_clip.create_model_and_transforms("tiny-clip", pretrained=tiny_laion["clip_weights"],
                                                      force_quick_gelu=True)
    with torch.no_grad():
        emb = tiny_laion["clip_model"].eval().encode_image(torch.stack([pre(p.convert("RGB")) for p in photos]))
        want = tiny_laion["head"].eval()(emb / emb.norm(dim=-1, keepdim=True)).reshape(-1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all((scorer.normalised(photos) >= 0) & (scorer.normalised(photos) <= 1))


def test_released_head_layout_loads():
    # the released sac+logos+ava1-l14-linearMSE.pth has exactly these keys and shapes
    shapes = {k: tuple(v.shape) for k, v in aesthetic_head(768).state_dict().items()}
    assert shapes == {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
                      "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
                      "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16),
                      "layers.7.bias": (1,)}


def test_a_scorer_without_weights_is_unavailable_with_the_reason(tmp_path):
    with pytest.raises(ScorerUnavailable, match="weights .* is not set"):
        load_scorer(ScorerSpec(name="laion", kind="laion"))
    with pytest.raises(ScorerUnavailable, match="does not exist"):
        load_scorer(ScorerSpec(name="artimuse", kind="artimuse", weights=str(tmp_path / "artimuse.pt")))
    with pytest.raises(ScorerUnavailable, match="model is not set"):
        load_scorer(ScorerSpec(name="qalign", kind="qalign"))


def test_qalign_expectation_is_the_rewards_over_five_levels():
    # uniform over 1..5 -> 3; all mass on 5 -> 5; the "0" level never counts
    assert qalign_score(np.zeros((1, 5)))[0] == pytest.approx(3.0)
    assert qalign_score(np.array([[-50, -50, -50, -50, 0.0]]))[0] == pytest.approx(5.0, abs=1e-6)
    lp = np.log(np.array([[0.1, 0.2, 0.3, 0.2, 0.2]]))
    assert qalign_score(lp)[0] == pytest.approx(0.1 * 1 + 0.2 * 2 + 0.3 * 3 + 0.2 * 4 + 0.2 * 5)


def test_qalign_scorer_on_the_tiny_vlm(tiny_models):
    scorer = load_scorer(ScorerSpec(name="qalign", kind="qalign", model=tiny_models["judge"], max_pixels=12544))
    got = scorer([sample_photo("astronaut"), sample_photo("chelsea")])
    assert got.shape == (2,) and np.all((got >= 1) & (got <= 5)) and scorer.scale == (1.0, 5.0)


def test_the_released_qalign_runs_by_its_own_code_for_its_task(tiny_qalign):
    from PIL import Image

    photos = [Image.new("RGB", (16, 16), WHITE), Image.new("RGB", (16, 16), BLACK)]
    quality = load_scorer(ScorerSpec(name="qalign", kind="qalign", model=tiny_qalign, trust_remote_code=True))
    np.testing.assert_allclose(quality(photos), [5.0, 1.0], atol=1e-5)
    assert quality.scale == (1.0, 5.0) and quality.settings["task"] == "quality"
    np.testing.assert_allclose(quality.normalised(photos), [1.0, 0.0], atol=1e-5)
    aesthetics = load_scorer(ScorerSpec(name="qalign", kind="qalign", model=tiny_qalign, trust_remote_code=True,
                                        task="aesthetics"))
    np.testing.assert_allclose(aesthetics(photos), [1.0, 5.0], atol=1e-5)


def test_a_released_qalign_that_cannot_be_loaded_is_skipped_with_the_reason(tmp_path):
    # a hub id on a machine without the hub, a folder without a checkpoint
    for model in ("q-future/one-align", str(tmp_path)):
        with pytest.raises(ScorerUnavailable, match="cannot be loaded with its own code"):
            load_scorer(ScorerSpec(name="qalign", kind="qalign", model=model, trust_remote_code=True))


def test_a_laion_clip_named_by_pretrained_tag_that_cannot_be_fetched_is_skipped(tiny_laion):
    # "openai" is open_clip's tag for OpenAI's ViT-L/14 weights; this machine has no hub
    with pytest.raises(ScorerUnavailable, match="CLIP weights 'openai' of ViT-L-14 cannot be loaded"):
        load_scorer(ScorerSpec(name="laion", kind="laion", clip="ViT-L-14", clip_weights="openai",
                               weights=tiny_laion["weights"]))


def test_vcmp_quality_filter_goes_through_the_same_interface(tmp_path):
    from aesformer.vcmp.quality import classical_aesthetic, load_scorer as vcmp_scorer

    photo = sample_photo("coffee")
    assert vcmp_scorer("classical:aesthetic")([photo])[0] == pytest.approx(classical_aesthetic(photo))
    s = scorer_from_name("classical:iqa")
    assert isinstance(s, ImageScorer) and s.scale == (0.0, 1.0)
    with pytest.raises(FileNotFoundError, match="quality.aesthetic"):
        vcmp_scorer(str(tmp_path / "missing.pt"), config_key="quality.aesthetic")


# -- VCMP's quality filter and evaluation share the scorers ---------------------------------------

def a40(job):
    import importlib

    from aesformer.config import load_config

    module = importlib.import_module(f"aesformer.jobs.{job}")
    schema = {"vcmp": "VcmpConfig", "evaluate": "EvaluateConfig"}[job]
    return load_config(getattr(module, schema), job, ["profile=a40", "input=x"] if job == "vcmp" else ["profile=a40"])


def test_the_a40_vcmp_filters_with_qalign_and_laion_as_evaluation_scores():
    from aesformer.scorers import scorer_spec

    q = a40("vcmp").quality
    # the paper's IQA score: the released Q-Align, by its own code, its quality task
    assert (q.iqa.kind, q.iqa.model, q.iqa.trust_remote_code, q.iqa.task) == \
        ("qalign", "q-future/one-align", True, "quality")
    # the paper's aesthetic score: LAION aesthetic v2 on OpenAI's CLIP ViT-L/14
    assert (q.aesthetic.kind, q.aesthetic.clip, q.aesthetic.clip_weights) == ("laion", "ViT-L-14", "openai")
    assert q.aesthetic.weights.endswith("sac+logos+ava1-l14-linearMSE.pth")
    # evaluation names the same weights (only its task, device and dtype differ)
    evaluation = {s["name"]: scorer_spec(s) for s in a40("evaluate").scorers}
    same = lambda a, b, skip: all(getattr(a, f) == getattr(b, f) for f in a.__dataclass_fields__ if f not in skip)
    assert same(q.aesthetic, evaluation["laion"], {"device"})
    assert same(q.iqa, evaluation["qalign"], {"device", "task", "dtype"}) and evaluation["qalign"].task == "aesthetics"
    # the tiny profile keeps the classical scorers
    from aesformer.config import load_config
    from aesformer.jobs.vcmp import VcmpConfig

    tiny = load_config(VcmpConfig, "vcmp", ["profile=tiny", "input=x"]).quality
    assert (tiny.iqa.kind, tiny.aesthetic.kind) == ("classical:iqa", "classical:aesthetic")


def test_a_scorer_kind_vcmp_does_not_know_is_a_config_error(tmp_path):
    from aesformer.config import ConfigError, load_config
    from aesformer.jobs.vcmp import VcmpConfig, check_inputs

    cfg = load_config(VcmpConfig, "vcmp", [f"input={tmp_path}", "quality.aesthetic.kind=nima"])
    with pytest.raises(ConfigError, match="quality.aesthetic.kind 'nima'"):
        check_inputs(cfg)


def quality_rows(photos):
    """One segment row whose frames 1.. are good frames, each paired with frame 0."""
    from aesformer.vcmp import rows as R

    frames = [{"t": float(i), "image": i} for i in range(len(photos))]
    pairs = [{"id": f"v-p{i}", "poor": 0, "good": i, "dropped": None, "scores": {}, "decisions": []}
             for i in range(1, len(photos))]
    row = R.new_row({"video_id": "v", "path": "/v.mp4"}, {"frames": frames, "pairs": pairs})
    row.update(kind="segment", segment_index=0,
               images=[R.encode(np.asarray(p.convert("RGB"))) for p in photos])
    return R.table([row])


@pytest.mark.timeout(300)
def test_vcmp_quality_filter_scores_with_the_learned_scorers_through_the_interface(tiny_models, tiny_laion,
                                                                                   tiny_qalign):
    from PIL import Image

    from aesformer.actors.vcmp_actors import FilterGoodImages
    from aesformer.vcmp import rows as R
    from aesformer.vcmp.settings import QualityConfig

    laion = ScorerSpec(name="laion", kind="laion", clip=tiny_laion["clip"], clip_weights=tiny_laion["clip_weights"],
                       weights=tiny_laion["weights"])
    qalign = ScorerSpec(name="qalign", kind="qalign", model=tiny_qalign, trust_remote_code=True)
    quality = QualityConfig(iqa=qalign, aesthetic=laion, iqa_min=0.5, aesthetic_min=0.0, vlm_threshold=0.0)
    photos = [sample_photo("astronaut").resize((96, 96)), Image.new("RGB", (96, 96), (250, 250, 250)),
              Image.new("RGB", (96, 96), (10, 10, 10)), sample_photo("coffee").resize((96, 96))]
    stage = FilterGoodImages(judge=tiny_models["judge"], engine="hf", quality=quality, max_pixels=12544, batch_size=4)
    pairs = R.info(R.rows_of(stage(quality_rows(photos)))[0])["pairs"]
    # each pair's scores are evaluation's scorers' own, mapped to [0, 1] from their scales
    goods = [R.decode(R.encode(np.asarray(p))) for p in photos[1:]]
    want_iqa = load_scorer(qalign).normalised(goods)
    want_aes = load_scorer(laion).normalised(goods)
    np.testing.assert_allclose([p["scores"]["iqa"] for p in pairs], want_iqa, atol=1e-4)
    np.testing.assert_allclose([p["scores"]["aesthetic"] for p in pairs], want_aes, atol=1e-4)
    # and decide: the dark frame's Q-Align score (1 of 5) is under iqa_min
    assert [p["dropped"] for p in pairs] == [None, "quality", None if want_iqa[2] >= 0.5 else "quality"]
    assert pairs[1]["reason"].startswith("iqa 0.")


@pytest.mark.timeout(300)
def test_vcmp_quality_filter_skips_a_scorer_without_weights_and_says_why(tiny_models, tmp_path):
    from aesformer.actors.vcmp_actors import FilterGoodImages
    from aesformer.vcmp import rows as R
    from aesformer.vcmp.settings import QualityConfig

    missing = ScorerSpec(name="laion", kind="laion", clip_weights="openai", weights=str(tmp_path / "head.pth"))
    quality = QualityConfig(aesthetic=missing, vlm_threshold=0.0, iqa_min=0.0)
    stage = FilterGoodImages(judge=tiny_models["judge"], engine="hf", quality=quality, max_pixels=12544, batch_size=4)
    assert set(stage.skipped) == {"aesthetic"} and "quality.aesthetic" in stage.skipped["aesthetic"]
    pairs = R.info(R.rows_of(stage(quality_rows([sample_photo("rocket"), sample_photo("coffee")])))[0])["pairs"]
    assert pairs[0]["dropped"] is None and pairs[0]["scores"]["aesthetic"] is None
    assert pairs[0]["scores"]["iqa"] is not None  # the classical IQA still scores
    assert "aesthetic skipped (quality.aesthetic: laion: weights (the aesthetic head)" in pairs[0]["decisions"][-1]["reason"]

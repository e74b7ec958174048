"""Image scorers behind one interface: the classical ones VCMP uses, LAION
aesthetic v2 (tiny CLIP + random head stand-ins), Q-Align-style on the tiny
VLM, and the reason a scorer is skipped."""
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


def test_vcmp_quality_filter_goes_through_the_same_interface(tmp_path):
    from aesformer.vcmp.quality import classical_aesthetic, load_scorer as vcmp_scorer

    photo = sample_photo("coffee")
    assert vcmp_scorer("classical:aesthetic")([photo])[0] == pytest.approx(classical_aesthetic(photo))
    s = scorer_from_name("classical:iqa")
    assert isinstance(s, ImageScorer) and s.scale == (0.0, 1.0)
    with pytest.raises(FileNotFoundError, match="quality.aesthetic"):
        vcmp_scorer(str(tmp_path / "missing.pt"), config_key="quality.aesthetic")

"""Stage 1(a) SFT, the parts without Ray: the DeepSpeed config, samples
(labels, cut-off, bad input), batching, the schedule, the data position, the
LoRA wrapping and the job's config."""
import io

import pytest
import torch
from PIL import Image

from aesformer import deepspeed_engine, sft
from aesformer.actions import SPECIAL_TOKENS, ActionPlan, thinker_instruction
from aesformer.config import ConfigError, load_config, parse_workers
from aesformer.jobs import sft as job

PLAN = ActionPlan("crop to 4:5", "zoom in", "rotate clockwise", "move the subject left", "keep the pose",
                  "keep the focus", "keep the color")


def png(size=(96, 64), color=(200, 120, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def thinker(tiny_models):
    from aesformer.models import add_plan_tokens, load_vlm

    model, processor = load_vlm(tiny_models["thinker"])
    add_plan_tokens(model, processor)
    return model, processor


# -- DeepSpeed config -----------------------------------------------------------------------

def test_deepspeed_config_carries_the_batch_precision_and_optimizer():
    conf = deepspeed_engine.deepspeed_config(zero_stage=3, bf16=True, lr=1e-4, weight_decay=0.01, grad_clip=1.0,
                               micro_batch=2, grad_accum=8)
    assert conf["train_micro_batch_size_per_gpu"] == 2
    assert conf["gradient_accumulation_steps"] == 8
    assert "train_batch_size" not in conf  # derived from the world size: elastic-friendly
    assert conf["zero_optimization"]["stage"] == 3
    assert conf["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert conf["bf16"] == {"enabled": True}
    assert conf["gradient_clipping"] == 1.0
    params = conf["optimizer"]["params"]
    assert conf["optimizer"]["type"] == "AdamW" and params["lr"] == 1e-4 and params["weight_decay"] == 0.01
    assert params["torch_adam"] is True  # nothing to compile, same maths on CPU and GPU
    assert "optimizer" not in deepspeed_engine.deepspeed_config(zero_stage=2, optimizer=False)


def test_deepspeed_config_rejects_impossible_settings():
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_engine.deepspeed_config(zero_stage=4)
    with pytest.raises(ValueError, match="micro_batch"):
        deepspeed_engine.deepspeed_config(micro_batch=0)
    with pytest.raises(ValueError, match="ZeRO stage 3"):
        deepspeed_engine.deepspeed_config(zero_stage=2, offload_params=True)


def test_torch_backend_is_gloo_without_cuda():
    assert deepspeed_engine.torch_backend() == ("nccl" if torch.cuda.is_available() else "gloo")


# -- samples -----------------------------------------------------------------------------------

def test_cap_pixels_keeps_the_aspect_under_the_budget():
    img = Image.new("RGB", (1000, 500))
    small = sft.cap_pixels(img, 4096)
    assert small.width * small.height <= 4096
    assert abs(small.width / small.height - 2.0) < 0.1
    assert sft.cap_pixels(Image.new("RGB", (60, 60)), 4096).size == (60, 60)
    assert sft.cap_pixels(img, None) is img


def test_sample_trains_on_the_plan_tokens_only(thinker):
    _, processor = thinker
    s = sft.build_sample(processor, png(), PLAN.render(), instruction=thinker_instruction(), cutoff=2048,
                         max_pixels=4096)
    labels, ids = s["labels"], s["input_ids"]
    assert labels.shape == ids.shape and ids.ndim == 1
    trained = ids[labels != sft.IGNORE_INDEX]
    assert processor.tokenizer.decode(trained) == PLAN.render() + "<|im_end|>"
    # the 14 tags are whole tokens of the extended vocabulary
    tag_ids = set(processor.tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)))
    assert len(tag_ids & set(trained.tolist())) == 14
    assert s["cut"] is False and s["plan_tokens"] == len(trained)
    # 96x64 capped at 4096 pixels: a 64x64 processed image, 4 vision tokens
    assert s["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_sample_longer_than_the_cutoff_is_cut_and_flagged(thinker):
    _, processor = thinker
    full = sft.build_sample(processor, png(), PLAN.render(), instruction=thinker_instruction(), cutoff=4096,
                            max_pixels=4096)
    n = full["input_ids"].shape[0]
    cut = sft.build_sample(processor, png(), PLAN.render(), instruction=thinker_instruction(), cutoff=n - 20,
                           max_pixels=4096)
    assert cut["cut"] is True
    assert cut["input_ids"].shape[0] == n - 20 and cut["labels"].shape[0] == n - 20
    # the plan's tail is what goes (the template's final newline was never trained on)
    assert cut["plan_tokens"] == int((full["labels"][:n - 20] != sft.IGNORE_INDEX).sum()) == full["plan_tokens"] - 19


def test_prompt_that_fills_the_cutoff_is_a_skip_reason(thinker):
    _, processor = thinker
    with pytest.raises(sft.SampleError, match="no room for the plan") as err:
        sft.build_sample(processor, png(), PLAN.render(), instruction=thinker_instruction(), cutoff=50, row="r1")
    assert err.value.reason == "too_long"


def test_image_that_does_not_decode_is_a_skip_reason(thinker):
    _, processor = thinker
    with pytest.raises(sft.SampleError) as err:
        sft.build_sample(processor, b"\x89PNG not really", PLAN.render(), instruction="x", cutoff=512, row="bad-1")
    assert err.value.reason == "image" and "bad-1" in str(err.value)


def test_plan_that_does_not_parse_is_a_skip_reason(thinker):
    _, processor = thinker
    broken = PLAN.render().replace("</Camera>", "")
    with pytest.raises(sft.SampleError) as err:
        sft.build_sample(processor, png(), broken, instruction="x", cutoff=512, row="bad-2")
    assert err.value.reason == "plan" and "camera" in str(err.value)
    with pytest.raises(sft.SampleError):
        sft.build_sample(processor, png(), None, instruction="x", cutoff=512)


def test_counts_add_up_across_workers():
    a, b = sft.SampleCounts(), sft.SampleCounts()
    a.add_used(cut=True), a.add_used(cut=False), a.add_skipped("image")
    b.add_used(cut=False), b.add_skipped("plan"), b.add_skipped("plan")
    total = sft.SampleCounts.from_vector([x + y for x, y in zip(a.as_vector(), b.as_vector())])
    assert total.to_dict() == {"used": 3, "cut": 1, "skipped": {"image": 1, "plan": 2, "too_long": 0}}
    assert sft.SampleCounts.from_dict(total.to_dict()) == total


def test_collate_right_pads_and_concatenates_images(thinker):
    _, processor = thinker
    short = ActionPlan("a", "b", "c", "d", "e", "f", "g").render()
    s1 = sft.build_sample(processor, png(), PLAN.render(), instruction="look", cutoff=1024, max_pixels=4096)
    s2 = sft.build_sample(processor, png((64, 64)), short, instruction="look", cutoff=1024, max_pixels=4096)
    pad = processor.tokenizer.pad_token_id
    batch = sft.collate([s1, s2], pad)
    n1, n2 = s1["input_ids"].shape[0], s2["input_ids"].shape[0]
    assert n1 > n2
    assert batch["input_ids"].shape == (2, n1)
    assert batch["input_ids"][1, n2:].eq(pad).all()
    assert batch["labels"][1, n2:].eq(sft.IGNORE_INDEX).all()
    assert batch["attention_mask"][1].sum() == n2
    assert batch["pixel_values"].shape[0] == s1["pixel_values"].shape[0] + s2["pixel_values"].shape[0]
    assert batch["image_grid_thw"].shape == (2, 3)


# -- schedule and data position -------------------------------------------------------------------

def test_cosine_schedule_with_warmup_matches_the_hugging_face_one():
    from transformers import get_cosine_schedule_with_warmup

    total, warmup = 72, sft.warmup_steps(72, 0.1)
    assert warmup == 8  # ceil(7.2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_cosine_schedule_with_warmup(opt, warmup, total)
    for step in range(total + 1):
        assert sft.lr_factor(step, total, warmup) == pytest.approx(hf.get_last_lr()[0], abs=1e-9)
        opt.step(), hf.step()
    assert sft.lr_factor(0, total, warmup) == 0.0
    assert sft.lr_factor(warmup, total, warmup) == 1.0
    assert sft.lr_factor(warmup + (total - warmup) // 2, total, warmup) == pytest.approx(0.5)
    assert sft.lr_factor(total, total, warmup) == pytest.approx(0.0)
    assert sft.lr_factor(30, total, warmup, "constant") == 1.0


def test_step_layout_counts_steps_over_workers_and_epochs():
    layout = sft.step_layout(rows=24, world_size=2, micro_batch=2, grad_accum=1, epochs=12)
    assert (layout.rows_per_worker, layout.total_steps, layout.micro_batches, layout.global_batch) == (144, 72, 72, 4)
    assert layout.samples_seen(10) == 40 and layout.epoch_at(36) == 6.0
    paper = sft.step_layout(rows=8168, world_size=8, micro_batch=2, grad_accum=8, epochs=2)
    assert paper.total_steps == 8168 * 2 // 8 // 16 == 127
    # a resumed run continues exactly where the samples seen end
    assert sft.resumed_step(layout.samples_seen(10), layout) == 10
    # an elastic restart on 3 workers: the step below the same samples
    assert sft.resumed_step(40, sft.step_layout(24, 3, 2, 1, 12)) == 6
    with pytest.raises(ValueError, match="cannot fill one optimizer step"):
        sft.step_layout(rows=10, world_size=2, micro_batch=2, grad_accum=8, epochs=1)


# -- model -------------------------------------------------------------------------------------------

def test_lora_on_language_linears_with_embeddings_and_head_in_full(tiny_models):
    from aesformer.models import add_plan_tokens, load_vlm

    model, processor = load_vlm(tiny_models["thinker"])
    add_plan_tokens(model, processor)
    targets = sft.language_model_linears(model)
    assert targets and all("language_model" in t for t in targets)
    assert not any("visual" in t or t.endswith("lm_head") for t in targets)
    peft_model = sft.apply_lora(model, rank=8, alpha=16, dropout=0.0)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert not any(".visual." in n for n in trainable)  # the vision tower is frozen
    lora = [n for n in trainable if "lora_" in n]
    assert len(lora) == 2 * len(targets)
    assert all(p.shape[0] == 8 or p.shape[1] == 8 for n, p in peft_model.named_parameters() if "lora_A" in n)
    full = [n for n in trainable if "lora_" not in n]
    assert any("embed_tokens.modules_to_save" in n for n in full)
    assert any("lm_head.modules_to_save" in n for n in full)
    vocab = len(processor.tokenizer)
    embed = dict(peft_model.named_parameters())[next(n for n in full if "embed_tokens" in n)]
    assert embed.shape[0] >= vocab  # resized for the 14 tags


# -- the job's config ------------------------------------------------------------------------------

def test_profiles_choose_the_deepspeed_setup():
    tiny = load_config(job.SFTConfig, "sft", ["data=/tmp"])
    assert (tiny.deepspeed.zero_stage, tiny.deepspeed.bf16) == (2, False)
    a40 = load_config(job.SFTConfig, "sft", ["profile=a40", "data=/tmp"])
    assert (a40.deepspeed.zero_stage, a40.deepspeed.bf16) == (3, True)
    # the paper's optimisation defaults
    assert (a40.lr, a40.epochs, a40.schedule, a40.warmup_ratio) == (1e-4, 2, "cosine", 0.1)
    assert (a40.micro_batch, a40.grad_accum, a40.cutoff, a40.max_image_pixels) == (2, 8, 2048, 1048576)
    assert (a40.lora.rank, a40.lora.full_modules) == (8, ["embed_tokens", "lm_head"])
    with pytest.raises(ConfigError, match="zero_stag"):
        load_config(job.SFTConfig, "sft", ["deepspeed.zero_stag=2"])


def test_num_workers_is_a_count_or_an_elastic_range():
    assert parse_workers(2) == 2
    assert parse_workers([2, 4]) == (2, 4)
    assert parse_workers([3, 3]) == 3
    for bad in (0, [4, 2], [1, 2, 3], "two"):
        with pytest.raises(ConfigError, match="num_workers"):
            parse_workers(bad)


def test_missing_data_is_a_config_error(tmp_path):
    cfg = load_config(job.SFTConfig, "sft", [f"output={tmp_path}"])
    with pytest.raises(ConfigError, match="data= is required"):
        job.run(cfg)
    cfg = load_config(job.SFTConfig, "sft", [f"output={tmp_path}", f"data={tmp_path}/nowhere"])
    with pytest.raises(ConfigError, match="does not exist"):
        job.run(cfg)


def test_training_rows_count_plans_in_the_split_and_take_unsplit_pairs_whole(tmp_path):
    from aesformer.data import ShardWriter, make_pair

    def rows(split, n, plan=PLAN):
        return [make_pair(f"{split}-{plan is None}-{i}", png(), png(), plan=plan, split=split) for i in range(n)]

    with ShardWriter(tmp_path / "split") as w:
        w.write_many(rows("train", 5) + rows("test", 2) + rows("train", 3, plan=None))
    cfg = load_config(job.SFTConfig, "sft", [f"data={tmp_path / 'split'}"])
    assert job.training_rows(cfg) == (5, "train")  # test rows and rows without a plan are left out
    with ShardWriter(tmp_path / "unsplit") as w:
        w.write_many(rows(None, 4))
    cfg = load_config(job.SFTConfig, "sft", [f"data={tmp_path / 'unsplit'}"])
    assert job.training_rows(cfg) == (4, None)


def test_zero_stage_auto_keeps_a_small_policy_whole_and_shards_an_8b_one():
    from aesformer.deepspeed_engine import choose_zero_stage, count_parameters
    from aesformer.tiny import ensure_tiny_models

    tiny = count_parameters(ensure_tiny_models()["thinker"])
    assert 100_000 < tiny < 10_000_000
    assert choose_zero_stage(tiny, bf16=False, world=2, rank_memory_bytes=8e9) == 2
    # 8.8B in bf16 on 8 A40s: 35 GB of weights and gradients per rank alone
    assert choose_zero_stage(8_800_000_000, bf16=True, world=8, rank_memory_bytes=48e9) == 3
    assert choose_zero_stage(1_000_000_000, bf16=True, world=8, rank_memory_bytes=48e9) == 2

"""Stage 2 editor LoRA job on the tiny profile: cache, train, export, reload."""
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    from aesformer.cluster import init_ray, shutdown_ray
    from aesformer.config import RayConfig

    init_ray(RayConfig(num_cpus=4, num_gpus=0, ship_code=False))
    yield
    shutdown_ray()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("editor_lora")


def _argv(run_dir, *extra):
    return ["profile=tiny", f"output={run_dir / 'run'}", f"cache.dir={run_dir / 'cache'}", *extra]


@pytest.fixture(scope="module")
def trained(ray_session, tiny_models, run_dir):
    from aesformer.jobs.editor_lora import main

    return main(_argv(run_dir, "validation.every=40"))  # renders during training too


def test_epoch_batches_are_single_bucket_and_even_across_ranks():
    from aesformer.editor_cache import epoch_batches

    def entry(i, w):
        return {"key": str(i), "target_w": w, "target_h": 96, "control_w": 64, "control_h": 64}

    entries = [entry(i, 128 if i % 3 else 96) for i in range(11)]  # 7 of one bucket, 4 of another
    layout = epoch_batches(entries, batch_size=2, seed=42, epoch=0, world=2)
    assert len(layout[0]) == len(layout[1]) == 3                        # 6 batches (4 + 2), dealt evenly
    for rank in layout:
        for batch in rank:
            assert len({e["target_w"] for e in batch}) == 1
    assert layout == epoch_batches(entries, 2, 42, 0, 2)                 # same arguments, same layout
    assert layout != epoch_batches(entries, 2, 42, 1, 2)                 # a new order every epoch


def test_training_loss_falls_by_30_percent(trained):
    losses = trained["losses"]
    assert trained["steps"] == len(losses) == 80                       # 8 pairs x 10 epochs
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last <= 0.7 * first, f"loss {first:.3f} -> {last:.3f}"


def test_export_is_a_diffusers_lora_with_a_model_card(trained, tiny_models):
    from diffusers import QwenImageEditPlusPipeline

    lora = Path(trained["lora"])
    card = (lora / "README.md").read_text()
    assert "base_model: tiny:editor" in card and "rank 16, alpha 1.0" in card
    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_models["editor"])
    pipe.load_lora_weights(str(lora))
    attn = pipe.transformer.transformer_blocks[0].attn
    assert "default_0" in attn.to_q.lora_A and "default_0" in attn.to_add_out.lora_A
    assert attn.to_q.scaling["default_0"] == pytest.approx(1 / 16)     # alpha 1, rank 16
    assert "default_0" in pipe.transformer.transformer_blocks[1].txt_mlp.net[2].lora_A


def test_exported_lora_reproduces_the_training_pipeline_exactly(trained, tiny_models):
    """The renderer applied the trained weights as in training (peft adapter +
    state dict); a fresh pipeline that loads the exported file must give the
    same pixels for the same seed."""
    from aesformer.data import decode_image, iter_pairs
    from aesformer.editor import Editor

    pair = trained["val_pairs"][0]
    row = next(r for r in iter_pairs(trained["data"]) if r["id"] == pair["id"])
    ed = Editor.load(tiny_models["editor"], lora=trained["lora"], control_area=4096, condition_area=3136,
                     device="cpu", name="tiny:editor")
    out = ed.edit(decode_image(row["poor_image"]), row["plan"], seed=42, steps=4, true_cfg_scale=4.0,
                  negative_prompt=" ", height=pair["height"], width=pair["width"])
    reference = decode_image((Path(trained["validation"]) / "final" / f"{pair['id']}.png").read_bytes())
    assert out.size == reference.size == (pair["width"], pair["height"])
    assert np.array_equal(np.asarray(out), np.asarray(reference))
    # and the LoRA changed the output: the base editor draws something else
    base = Editor.load(tiny_models["editor"], control_area=4096, condition_area=3136, device="cpu")
    plain = base.edit(decode_image(row["poor_image"]), row["plan"], seed=42, steps=4, true_cfg_scale=4.0,
                      negative_prompt=" ", height=pair["height"], width=pair["width"])
    assert not np.array_equal(np.asarray(plain), np.asarray(reference))


def test_second_cache_run_encodes_nothing(trained, run_dir):
    from aesformer.config import load_config
    from aesformer.jobs.editor_lora import EditorLoraConfig, build_cache, training_rows
    from aesformer.models import resolve_model

    assert trained["cache"]["encoded"] == 8 and trained["cache"]["hits"] == 0
    folder = Path(trained["cache"]["folder"])
    shards_before = sorted(p.name for p in folder.glob("*.parquet"))
    cfg = load_config(EditorLoraConfig, "editor_lora", _argv(run_dir))
    editor = resolve_model(cfg.models.editor, cfg.models.cache_dir)
    ids = {r["id"] for r in training_rows(trained["data"], "train")}
    entries, stats, _ = build_cache(cfg, editor, trained["data"], ids)
    assert stats["encoded"] == 0 and stats["hits"] == 8 and stats["hit_rate"] == 1.0
    assert sorted(p.name for p in folder.glob("*.parquet")) == shards_before  # no encoder wrote anything
    assert set(entries) == ids


def test_pairs_beyond_the_hand_over_size_are_read_by_ray_data_into_the_same_entries(trained, run_dir, monkeypatch):
    """The job keeps the pairs to encode from its own read while their images
    stay under HAND_OVER_BYTES; past it, Ray Data reads them: same keys, same
    tensors."""
    from aesformer.config import load_config
    from aesformer.editor_cache import CacheReader
    from aesformer.jobs import editor_lora
    from aesformer.models import resolve_model

    monkeypatch.setattr(editor_lora, "HAND_OVER_BYTES", 0)
    cfg = load_config(editor_lora.EditorLoraConfig, "editor_lora", _argv(run_dir, f"cache.dir={run_dir / 'cache-ray'}"))
    editor = resolve_model(cfg.models.editor, cfg.models.cache_dir)
    ids = sorted(r["id"] for r in editor_lora.training_rows(trained["data"], "train"))[:2]
    entries, stats, _ = editor_lora.build_cache(cfg, editor, trained["data"], set(ids))
    assert stats["encoded"] == 2 and set(entries) == set(ids)
    before, _, _ = editor_lora.build_cache(load_config(editor_lora.EditorLoraConfig, "editor_lora", _argv(run_dir)),
                                           editor, trained["data"], set(ids))  # the training run's cache
    reader = CacheReader()
    for i in ids:
        a, b = reader.tensors(entries[i]), reader.tensors(before[i])
        assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a), i


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_mlflow_has_losses_per_timestep_bucket_and_validation_grids(trained, run_dir):
    from mlflow.tracking import MlflowClient

    from aesformer.tracking import default_uri

    client = MlflowClient(default_uri(run_dir / "run"))
    run = client.search_runs([client.get_experiment_by_name("aesformer").experiment_id],
                             "tags.`aesformer.job` = 'editor_lora'")[0]
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 80
    names = set(run.data.metrics)
    assert {"lr", "step_time", "cache/hit_rate"} <= names
    assert any(n.startswith("loss/t0.") for n in names)
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "validation")]
    assert "validation/step_00000040.png" in grids and "validation/final.png" in grids


def test_resume_auto_continues_from_the_last_checkpoint(trained, run_dir):
    from aesformer.jobs.editor_lora import main

    more = main(_argv(run_dir, "epochs=11", "validation.pairs=0", "tracking.enabled=false"))
    assert more["cache"]["encoded"] == 0
    assert more["steps"] == 88
    assert more["losses"][:80] == trained["losses"]                     # the first 80 steps were not redone

"""Every job with its files at an S3 URI: a real S3 endpoint (moto's server on
127.0.0.1, one for the module; credentials and endpoint from environment
variables, as on a cluster node) and one Ray session for the module, started
with that environment so its workers reach the endpoint too. Each training job
trains, checkpoints, stops and resumes with ``output=s3://...`` (GRPO-A does so
on the simulated cluster, in test_multinode.py); the dataset jobs read and
write their datasets there. Nothing a job writes lands on the
local disk but its log and tracking staging folder."""
from __future__ import annotations

import json
import os

import pytest
from helpers import s3_server

from aesformer import storage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("s3")
    names = ["AESFORMER_MODEL_CACHE", "AESFORMER_STAGING"]
    with s3_server(folder) as server:
        env = {**server["env"], "AESFORMER_MODEL_CACHE": str(folder / "model-cache"),
               "AESFORMER_STAGING": str(folder / "staging")}
        saved = {k: os.environ.get(k) for k in list(env) + names}
        os.environ.update(env)
        yield {**server, "root": f"s3://{server['bucket']}", "local": folder}
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def ray_session(s3):
    import ray

    from aesformer.cluster import worker_env

    ray.init(address="local", num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": worker_env()}, log_to_driver=False)
    yield ray
    ray.shutdown()


def lines(uri: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_text(uri).splitlines()]


@pytest.mark.timeout(900)
def test_sft_reads_its_pairs_from_s3_trains_checkpoints_resumes_and_exports_there(ray_session, s3, tiny_models):
    from sft_pairs import pair_rows

    from aesformer.data import ShardWriter
    from aesformer.jobs.sft import main

    data = f"{s3['root']}/sft-pairs"
    with ShardWriter(data, shard_rows=4) as writer:
        assert writer.write_many(pair_rows(variants=2)[:8]) == 8
    out = f"{s3['root']}/sft"
    common = [f"data={data}", f"output={out}", "epochs=2", "checkpoint_every=2", "sample_log=true"]
    first = main(common + ["max_steps=2"])  # 8 rows x 2 epochs / 4 per step = 4 steps
    assert (first["step"], first["done"]) == (2, False)
    assert first["checkpoint"] == f"{out}/ray/sft/checkpoint-0000002"
    second = main(common + ["resume=auto"])
    assert (second["step"], second["done"]) == (4, True)
    assert {"checkpoint-0000002", "checkpoint-0000004"} <= set(storage.listdir(storage.join(out, "ray", "sft")))
    state = storage.read_json(storage.join(out, "ray", "sft", "checkpoint-0000004", "trainer_state.json"))
    assert state["done"] and state["world_size"] == 2
    # each rank's sample log: steps 1-2 from the first run, 3-4 from the second
    assert [r["step"] for r in lines(storage.join(out, "sample_log", "rank0.jsonl"))] == [1, 2, 3, 4]
    assert second["export"] == storage.join(out, "export", "merged")
    assert storage.exists(storage.join(out, "export", "merged", "config.json"))
    assert storage.exists(storage.join(out, "export", "adapter", "adapter_config.json"))
    # the embedded tracking store's artifacts went to the output too
    artifacts = storage.glob(out, "mlflow/artifacts/*/artifacts/*")  # <experiment location>/<run id>/artifacts
    assert any(storage.name(a) == "trainer_state.json" for a in artifacts), artifacts


@pytest.mark.timeout(900)
def test_the_editor_trains_checkpoints_and_resumes_with_its_output_on_s3(ray_session, s3, tiny_models):
    from aesformer.jobs.editor_lora import main

    out = f"{s3['root']}/editor"
    common = ["profile=tiny", f"output={out}", f"cache.dir={s3['local'] / 'editor-cache'}", "sample_pairs=4",
              "checkpoint_every=2", "validation.every=0", "validation.steps=2", "tracking.enabled=false"]
    first = main(common + ["epochs=1", "validation.pairs=1"])
    assert first["checkpoint"].startswith(f"{out}/checkpoints/train-")
    assert storage.exists(storage.join(first["checkpoint"], "trainer_state.json"))
    assert first["lora"] == storage.join(out, "lora") and storage.exists(storage.join(out, "lora", "README.md"))
    assert storage.exists(storage.join(out, "validation", "final.png"))
    assert storage.listdir(storage.join(out, "sample_pairs")) == ["part-00000.parquet"]

    second = main(common + ["epochs=2", "validation.pairs=0"])
    assert second["steps"] == 2 * first["steps"]
    assert second["losses"][:first["steps"]] == first["losses"]  # resumed, not redone
    assert storage.read_text(storage.join(out, "losses.json")).count(",") == second["steps"] - 1


@pytest.mark.timeout(900)
def test_vcmp_writes_its_dataset_to_s3_and_distill_reads_it_there_and_writes_its_own(ray_session, s3, tiny_models,
                                                                                    tmp_path):
    from aesformer.data import read_table
    from aesformer.jobs.distill import main as distill
    from aesformer.jobs.make_samples import main as make_samples
    from aesformer.jobs.vcmp import main as vcmp

    make_samples([f"output={tmp_path / 'videos'}", "videos=2", "tracking.enabled=false"])
    mined = f"{s3['root']}/vcmp"
    first = vcmp([f"input={tmp_path / 'videos'}", f"output={mined}", "tracking.enabled=false"])
    assert first["pairs"] > 0 and first["dataset"] == storage.join(mined, "pairs")
    assert read_table(first["dataset"], columns=["id"]).num_rows == first["pairs"]
    assert storage.exists(storage.join(mined, "frames")) and storage.exists(storage.join(mined, "funnel.json"))
    assert storage.exists(storage.join(mined, "contact_sheet.png"))
    again = vcmp([f"input={tmp_path / 'videos'}", f"output={mined}", "tracking.enabled=false"])
    assert again["new_videos"] == 0 and again["pairs"] == first["pairs"]  # its state log on S3 says both are done

    out = f"{s3['root']}/distill"
    result = distill(["profile=tiny", f"input={mined}", f"output={out}", "transcript.enabled=false"])
    assert result["dataset"] == storage.join(out, "pairs")
    plans = read_table(result["dataset"], columns=["id", "plan"])
    assert plans.num_rows == result["summary"]["accepted"] > 0 and plans.column("plan").null_count == 0
    # (an empty rejects folder holds no object, so S3 has none)
    assert {storage.name(p) for p in storage.glob(out, "*")} >= {"pairs", "rejects.jsonl", "attempts.jsonl",
                                                                 "summary.json", "cache.sqlite", "sft"}
    rerun = distill(["profile=tiny", f"input={mined}", f"output={out}", "transcript.enabled=false"])
    assert rerun["summary"]["reused_from_cache"] == result["summary"]["accepted"] + sum(
        result["summary"]["rejected"].values())

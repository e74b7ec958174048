"""Storage: the same helpers for a local folder and a URI of a pyarrow
filesystem, here a real S3 endpoint (moto's server on 127.0.0.1, one per
module, credentials from environment variables)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import s3_server

from aesformer import storage


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        saved = {k: os.environ.get(k) for k in server["env"]}
        os.environ.update(server["env"])
        yield server
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def root(s3, request):
    return f"s3://{s3['bucket']}/{request.node.name}"


def test_uris_join_and_split_like_paths():
    assert storage.is_uri("s3://b/x") and storage.is_uri("gs://b/x") and storage.is_uri("hdfs://h:9000/x")
    assert not storage.is_uri("/tmp/x") and not storage.is_uri("file:///tmp/x") and not storage.is_uri("runs/x")
    assert storage.join("s3://b/run", "checkpoints", "step-000002") == "s3://b/run/checkpoints/step-000002"
    assert storage.join("s3://b/run/", "a") == "s3://b/run/a"
    assert storage.join("s3://b/run?endpoint_override=h:1", "a") == "s3://b/run/a?endpoint_override=h:1"
    assert storage.name("s3://b/run/step-000002") == "step-000002"
    assert storage.parent("s3://b/run/step-000002") == "s3://b/run"
    assert storage.join("/tmp/run", "a") == "/tmp/run/a"


def test_files_written_to_s3_read_back_list_and_go(root):
    assert not storage.exists(root) and storage.listdir(root) == []
    storage.write_json(storage.join(root, "result.json"), {"step": 3, "name": "é"})
    storage.write_text(storage.join(root, "checkpoints", "step-000001", "trainer_state.json"), "{}")
    storage.write_text(storage.join(root, "checkpoints", "step-000002", "trainer_state.json"), "{}")
    assert storage.read_json(storage.join(root, "result.json")) == {"step": 3, "name": "é"}
    assert storage.is_dir(root) and storage.is_file(storage.join(root, "result.json"))
    assert storage.listdir(root) == ["checkpoints", "result.json"]
    assert storage.glob(root, "checkpoints/step-*") == [storage.join(root, "checkpoints", f"step-00000{i}")
                                                        for i in (1, 2)]
    storage.remove(storage.join(root, "checkpoints", "step-000001"))
    assert storage.listdir(storage.join(root, "checkpoints")) == ["step-000002"]
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        storage.read_bytes(storage.join(root, "nothing.json"))


def test_a_folder_goes_up_and_comes_back_byte_for_byte(root, tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "weights.bin").write_bytes(os.urandom(6 << 20))  # more than one multipart part
    storage.upload(src, storage.join(root, "model"))
    back = storage.download(storage.join(root, "model"), tmp_path / "back")
    assert (back / "config.json").read_text() == '{"a": 1}'
    assert (back / "sub" / "weights.bin").read_bytes() == (src / "sub" / "weights.bin").read_bytes()


def test_write_dir_replaces_the_whole_folder(root):
    target = storage.join(root, "export")
    storage.write_dir(target, lambda d: [(d / "old.txt").write_text("old"), (d / "keep.txt").write_text("1")])
    storage.write_dir(target, lambda d: (d / "keep.txt").write_text("2"))
    assert storage.listdir(target) == ["keep.txt"]
    assert storage.read_text(storage.join(target, "keep.txt")) == "2"


def test_a_model_at_a_uri_is_downloaded_once_per_content_into_the_nodes_cache(root, tmp_path, monkeypatch):
    monkeypatch.setenv("AESFORMER_MODEL_CACHE", str(tmp_path / "cache"))
    folder = storage.join(root, "thinker")
    storage.write_text(storage.join(folder, "config.json"), '{"v": 1}')
    first = storage.local_copy(folder)
    assert json.loads(open(os.path.join(first, "config.json")).read()) == {"v": 1}
    assert first.startswith(str(tmp_path / "cache"))
    assert storage.local_copy(folder) == first  # cached
    storage.write_text(storage.join(folder, "config.json"), '{"v": 2, "changed": true}')
    second = storage.local_copy(folder)
    assert second != first and json.loads(open(os.path.join(second, "config.json")).read())["v"] == 2
    assert storage.local_copy("/some/local/path") == "/some/local/path"
    with pytest.raises(FileNotFoundError):
        storage.local_copy(storage.join(root, "missing"))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_jsonl_log_grows_and_drops_records_after_a_resume_point(where, root, tmp_path):
    location = str(tmp_path / "steps.jsonl") if where == "local" else storage.join(root, "steps.jsonl")
    log = storage.Appender(location)
    for step in (1, 2, 3):
        log.write({"step": step})
    again = storage.Appender(location)  # a resumed run
    again.keep(lambda r: r["step"] <= 2)
    again.write({"step": 3, "redone": True})
    lines = [json.loads(x) for x in storage.read_text(location).splitlines()]
    assert lines == [{"step": 1}, {"step": 2}, {"step": 3, "redone": True}]


def test_checkpoints_at_a_uri_are_found_resumed_and_pruned_like_local_ones(root):
    from aesformer import checkpoints

    ckpts = storage.join(root, "checkpoints")
    for step in (1, 2, 3):
        storage.write_bytes(storage.join(ckpts, f"step-{step:06d}", "weights.bin"), b"w")
        checkpoints.write_state(storage.join(ckpts, f"step-{step:06d}"), {"step": step})
    storage.write_bytes(storage.join(ckpts, "step-000004", "weights.bin"), b"w")  # no state file: incomplete
    folder, state = checkpoints.resolve_resume("auto", ckpts, "step-*")
    assert folder == storage.join(ckpts, "step-000003") and state["step"] == 3
    assert checkpoints.resolve_resume(storage.join(ckpts, "step-000002"), ckpts, "step-*")[1]["step"] == 2
    assert checkpoints.prune(ckpts, "step-*", keep=2) == [storage.join(ckpts, "step-000001")]
    assert storage.listdir(ckpts) == ["step-000002", "step-000003", "step-000004"]
    with pytest.raises(Exception, match="not a checkpoint"):
        checkpoints.check_resume(storage.join(ckpts, "step-000004"))


def test_a_dataset_at_a_uri_is_written_found_and_read_like_a_local_one(root):
    from aesformer.data import find_dataset, iter_pairs, read_table, shard_dataset
    from aesformer.synth import sample_aesrecon

    data = storage.join(root, "run", "pairs")
    assert sample_aesrecon(data, 4, 0, test_fraction=0.25) == data
    assert storage.listdir(data) == ["part-00000.parquet"]
    assert find_dataset(storage.join(root, "run")) == data  # an earlier job's output means its pairs/
    table = read_table(data, columns=["id", "split"])
    assert table.num_rows == 4 and table.column("split").to_pylist().count("test") == 1
    assert len(list(iter_pairs(data, ["id"], split="train"))) == 3
    assert shard_dataset(data).count_rows() == 4
    assert sample_aesrecon(data, 5, 0) == data  # a rerun adds only the missing pair
    assert read_table(data, columns=["id"]).num_rows == 5 and len(storage.listdir(data)) == 2


def test_a_job_that_cannot_write_to_a_uri_says_so_before_any_work(capsys):
    from aesformer.jobs.reconstruct import main

    with pytest.raises(SystemExit) as exit_:
        main(["output=s3://bucket/reconstruct", "input=photos"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "reconstruct writes its output to a local or shared folder only" in err and "grpo_a" in err


# -- folders at a URI appear complete or not at all ---------------------------------------

def _model(version: str, files: int = 3):
    def write(d):
        (d / "config.json").write_text(json.dumps({"version": version}))
        for i in range(files):
            (d / f"weights-{i}.bin").write_bytes(version.encode() * 1000)
    return write


def test_a_folder_write_that_fails_half_way_leaves_the_previous_folder(root, tmp_path, monkeypatch):
    monkeypatch.setenv("AESFORMER_MODEL_CACHE", str(tmp_path / "cache"))
    target = storage.join(root, "export")
    storage.write_dir(target, _model("v1"))
    real_upload = storage.upload

    def dies_half_way(local, location):  # the second file's upload is where the writer dies
        files = sorted(p for p in Path(local).rglob("*") if p.is_file())
        storage.write_bytes(storage.join(location, files[0].name), files[0].read_bytes())
        raise ConnectionError("the writer died")

    monkeypatch.setattr(storage, "upload", dies_half_way)
    with pytest.raises(ConnectionError):
        storage.write_dir(target, _model("v2"))
    monkeypatch.setattr(storage, "upload", real_upload)
    # the previous folder, whole; nothing of the failed write beside it
    assert storage.listdir(root) == ["export"]
    copy = storage.local_copy(target)
    assert json.loads(open(os.path.join(copy, "config.json")).read()) == {"version": "v1"}
    assert sorted(os.listdir(copy)) == ["config.json", "weights-0.bin", "weights-1.bin", "weights-2.bin"]
    storage.write_dir(target, _model("v3", files=1))
    assert storage.listdir(target) == ["config.json", "weights-0.bin"]
    assert json.loads(open(os.path.join(storage.local_copy(target), "config.json")).read())["version"] == "v3"


def test_a_folder_whose_swap_died_is_seen_by_no_reader_until_written_again(root, tmp_path, monkeypatch):
    from aesformer.config import ConfigError
    from aesformer.data import find_dataset, finished_shards
    from aesformer.synth import sample_aesrecon

    monkeypatch.setenv("AESFORMER_MODEL_CACHE", str(tmp_path / "cache"))
    local = tmp_path / "pairs"
    sample_aesrecon(str(local), 4, 0)
    pairs = storage.join(root, "run", "pairs")
    copy_shards = lambda d: shutil.copytree(local, d, dirs_exist_ok=True)  # noqa: E731
    storage.write_dir(pairs, copy_shards)
    assert find_dataset(storage.join(root, "run")) == pairs and len(finished_shards(pairs)) == 1
    real_parallel, real_swap = storage._parallel, storage._swap

    def copies_die(jobs):
        raise ConnectionError("the writer died")

    def swap_dies(*args):  # the writer dies in the swap, once the old files are gone
        monkeypatch.setattr(storage, "_parallel", copies_die)
        real_swap(*args)

    monkeypatch.setattr(storage, "_swap", swap_dies)
    with pytest.raises(ConnectionError):
        storage.write_dir(pairs, copy_shards)
    monkeypatch.setattr(storage, "_swap", real_swap)
    monkeypatch.setattr(storage, "_parallel", real_parallel)
    assert finished_shards(pairs) == [] and not storage.is_complete(pairs)
    with pytest.raises(ConfigError, match="being written, or its last write failed"):
        find_dataset(storage.join(root, "run"))
    with pytest.raises(storage.IncompleteFolder):
        storage.local_copy(pairs)
    storage.write_dir(pairs, copy_shards)  # the next write puts it right and leaves nothing behind
    assert find_dataset(pairs) == pairs and storage.listdir(storage.join(root, "run")) == ["pairs"]
    assert storage.local_copy(pairs)


def test_a_reader_never_lists_a_half_written_checkpoint(root):
    from aesformer import checkpoints

    ckpts = storage.join(root, "checkpoints")
    built = storage.join(root, "built")  # a checkpoint as a trainer writes it, state file last
    storage.write_bytes(storage.join(built, "model", "weights.bin"), b"w" * 5000)
    storage.write_bytes(storage.join(built, "optimizer.pt"), b"o" * 3000)
    checkpoints.write_state(built, {"step": 2})
    storage.write_dir(storage.join(ckpts, "step-000001"), _model("old", files=1))
    checkpoints.write_state(storage.join(ckpts, "step-000001"), {"step": 1})
    # another program copies it file by file, the state file first (Ray Train uploading a worker's folder)
    half = storage.join(ckpts, "step-000002")
    storage.write_bytes(storage.join(half, checkpoints.STATE_FILE),
                        storage.read_bytes(storage.join(built, checkpoints.STATE_FILE)))
    storage.write_bytes(storage.join(half, "optimizer.pt"), storage.read_bytes(storage.join(built, "optimizer.pt")))
    assert [state["step"] for _, state in checkpoints.find(ckpts, "step-*")] == [1]
    assert checkpoints.resolve_resume("auto", ckpts, "step-*")[1]["step"] == 1
    storage.write_bytes(storage.join(half, "model", "weights.bin"), b"w" * 5000)
    assert checkpoints.newest(ckpts, "step-*")[1]["step"] == 2
    # a checkpoint written again is none while it is rewritten
    checkpoints.begin(half)
    assert checkpoints.newest(ckpts, "step-*")[1]["step"] == 1

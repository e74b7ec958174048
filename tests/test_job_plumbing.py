"""The run plumbing every job shares: atomic writes, checkpoints and resume,
the entry point's one-line errors, the tracked run, defaults in one place."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aesformer import atomic, checkpoints
from aesformer.config import ConfigError, conf_dir, load_config, parse_workers

ROOT = Path(__file__).resolve().parents[1]

JOBS = {"sft": "SFTConfig", "grpo_a": "GrpoAConfig", "editor_lora": "EditorLoraConfig",
        "distill": "DistillConfig", "vcmp": "VcmpConfig", "reconstruct": "ReconstructConfig",
        "doctor": "DoctorConfig", "make_samples": "MakeSamplesConfig", "make_tiny": "MakeTinyConfig",
        "quickstart": "QuickstartConfig", "evaluate": "EvaluateConfig", "rate": "RateConfig",
        "serve": "ServeJobConfig"}


# -- atomic writes -------------------------------------------------------------------------------

def test_atomic_writes_leave_only_the_final_files(tmp_path):
    atomic.write_json(tmp_path / "a" / "state.json", {"step": 3, "name": "café"})
    assert atomic.write_jsonl(tmp_path / "rows.jsonl", [{"i": 1}, {"i": 2}]) == 2
    atomic.write_text(tmp_path / "note.txt", "hello")
    assert json.loads((tmp_path / "a" / "state.json").read_text()) == {"step": 3, "name": "café"}
    assert (tmp_path / "rows.jsonl").read_text() == '{"i": 1}\n{"i": 2}\n'
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "note.txt", "rows.jsonl", "state.json"]


def test_a_failed_folder_write_keeps_the_old_folder(tmp_path):
    final = tmp_path / "model"
    atomic.write_dir(final, lambda d: (d / "weights").write_text("old"))

    def broken(d):
        (d / "weights").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic.write_dir(final, broken)
    assert (final / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    atomic.write_dir(final, lambda d: (d / "weights").write_text("new"))
    assert (final / "weights").read_text() == "new"


# -- checkpoints and resume ----------------------------------------------------------------------

def _checkpoint(root, name, step, written_at=None):
    folder = root / name
    folder.mkdir(parents=True)
    state = {"step": step}
    if written_at is not None:
        state["written_at"] = written_at
    checkpoints.write_state(folder, state)
    return folder


def test_newest_is_the_highest_step_and_incomplete_folders_do_not_count(tmp_path):
    _checkpoint(tmp_path, "step-000002", 2)
    newest = _checkpoint(tmp_path, "step-000004", 4)
    (tmp_path / "step-000006").mkdir()  # no state file yet: still being written
    folder, state = checkpoints.newest(tmp_path, "step-*")
    assert folder == newest and state["step"] == 4


def test_prune_keeps_the_newest_n(tmp_path):
    for step in (1, 2, 3, 4):
        _checkpoint(tmp_path, f"step-{step:06d}", step)
    gone = checkpoints.prune(tmp_path, "step-*", keep=2)
    assert [p.name for p in gone] == ["step-000001", "step-000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003", "step-000004"]


def test_resume_means_the_same_in_every_job(tmp_path):
    folder = _checkpoint(tmp_path, "run/checkpoint_1", 5)
    assert checkpoints.resolve_resume("never", tmp_path, "*/checkpoint_*") is None
    assert checkpoints.resolve_resume("auto", tmp_path, "*/checkpoint_*")[0] == folder
    assert checkpoints.resolve_resume("auto", tmp_path / "empty", "*/checkpoint_*") is None
    assert checkpoints.resolve_resume(str(folder), tmp_path, "*/checkpoint_*")[1]["step"] == 5
    with pytest.raises(ConfigError, match="must be auto, never or a checkpoint folder"):
        checkpoints.check_resume("none")
    with pytest.raises(ConfigError, match="no readable trainer_state.json"):
        checkpoints.check_resume(str(tmp_path))


def test_every_training_job_resumes_automatically_by_default():
    for job in ("sft", "grpo_a", "editor_lora"):
        module = importlib.import_module(f"aesformer.jobs.{job}")
        cfg = load_config(getattr(module, JOBS[job]), job, [])
        assert cfg.resume == "auto", job


def test_one_worker_count_parser():
    assert parse_workers(2) == 2
    assert parse_workers([2, 4]) == (2, 4)
    with pytest.raises(ConfigError, match="1 <= min <= max"):
        parse_workers([4, 2])


# -- config messages that name the fix ------------------------------------------------------------

def test_a_scalar_for_a_section_names_the_key_to_set():
    from aesformer.jobs.distill import DistillConfig
    from aesformer.jobs.grpo_a import GrpoAConfig

    with pytest.raises(ConfigError, match=r"'teacher' is a section.*did you mean 'teacher.kind=measured'"):
        load_config(DistillConfig, "distill", ["teacher=measured"])
    with pytest.raises(ConfigError, match=r"'rollout' is a section.*rollout.n"):
        load_config(GrpoAConfig, "grpo_a", ["rollout=5"])


def test_a_spelled_out_key_suggests_the_short_one():
    from aesformer.jobs.grpo_a import GrpoAConfig
    from aesformer.jobs.sft import SFTConfig

    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rate' .*did you mean 'lr'\?$"):
        load_config(SFTConfig, "sft", ["learning_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"did you mean 'learner.lr'\?$"):
        load_config(GrpoAConfig, "grpo_a", ["learner.learning_rate=1e-4"])


def test_a_previous_jobs_output_folder_means_the_dataset_inside_it(tmp_path):
    from aesformer.data import ShardWriter, find_dataset, make_pair
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    with ShardWriter(tmp_path / "distill" / "pairs") as w:
        w.write(make_pair("p1", buf.getvalue(), buf.getvalue()))
    assert find_dataset(tmp_path / "distill") == (tmp_path / "distill" / "pairs").resolve()
    with pytest.raises(ConfigError, match=rf"pass data={tmp_path / 'distill' / 'pairs'}"):
        find_dataset(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        find_dataset(tmp_path / "nowhere")


# -- the entry point ----------------------------------------------------------------------------

BAD_RUNS = {
    # job: (arguments, what the one line says); output= is added by the test
    "sft": (["data={missing}"], "does not exist"),
    "grpo_a": (["data={missing}"], "does not exist"),
    "editor_lora": (["data={empty}"], "holds no AesRecon pair shards"),
    "distill": (["input={empty}"], "holds no AesRecon pair shards"),
    "vcmp": (["input={missing}"], "does not exist"),
    "reconstruct": (["input={missing}"], "does not exist"),
    "doctor": (["matmul_nn=3"], "did you mean 'matmul_n'"),
    "make_samples": (["video=3"], "did you mean 'videos'"),
    "make_tiny": (["log_level=loud"], "log_level must be one of"),
    "quickstart": (["teacher=measured"], "unknown config key 'teacher'"),
}


@pytest.mark.parametrize("job", sorted(BAD_RUNS))
def test_a_bad_input_is_one_line_and_exit_2_with_nothing_left_behind(job, tmp_path, capsys):
    module = importlib.import_module(f"aesformer.jobs.{job}")
    (tmp_path / "empty").mkdir()
    args, says = BAD_RUNS[job]
    out = tmp_path / "out"
    argv = [a.format(missing=tmp_path / "missing", empty=tmp_path / "empty") for a in args] + [f"output={out}"]
    with pytest.raises(SystemExit) as ended:
        module.main(argv)
    assert ended.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{job}: ") and says in err[0], err
    assert not out.exists()


def test_the_command_line_gets_the_same_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "jobs" / "grpo_a.py"), "data=/nonexistent",
                          f"output={tmp_path / 'out'}"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == "grpo_a: data='/nonexistent' does not exist"
    assert not (tmp_path / "out").exists()


# -- the tracked run ----------------------------------------------------------------------------

def test_a_failing_run_is_recorded_as_failed_with_its_error(tmp_path):
    from mlflow.tracking import MlflowClient

    from aesformer.jobs.doctor import DoctorConfig
    from aesformer.tracking import Tracker

    cfg = load_config(DoctorConfig, "doctor", [f"output={tmp_path}"])
    with pytest.raises(ValueError):
        with Tracker.start(cfg, "doctor") as tracker:
            raise ValueError("the data ran out")
    run = MlflowClient(tracking_uri=tracker.uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["aesformer.error"] == "ValueError: the data ran out"


# -- defaults in one place ----------------------------------------------------------------------

def _repeats(data: dict, defaults: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in data.items():
        default = defaults.get(key, object())
        if isinstance(value, dict) and isinstance(default, dict):
            found += _repeats(value, default, f"{prefix}{key}.")
        elif value == default:
            found.append(prefix + key)
    return found


@pytest.mark.parametrize("job", sorted(JOBS))
def test_a_job_yaml_holds_only_what_differs_from_the_dataclass(job):
    from omegaconf import OmegaConf

    schema = getattr(importlib.import_module(f"aesformer.jobs.{job}"), JOBS[job])
    defaults = OmegaConf.to_container(OmegaConf.structured(schema))
    data = yaml.safe_load((conf_dir() / f"{job}.yaml").read_text()) or {}
    assert _repeats(data, defaults) == [], f"conf/{job}.yaml repeats these defaults of jobs/{job}.py"


# -- progress -------------------------------------------------------------------------------------

def test_a_progress_line_gives_count_rate_and_eta_from_the_reports_not_the_start_up(caplog):
    import logging

    from aesformer import progress

    clock = iter([0.0, 100.0, 100.0, 110.0, 110.0, 120.0, 120.0])
    real = progress.time.perf_counter
    progress.time.perf_counter = lambda: next(clock)
    try:
        with caplog.at_level(logging.INFO, logger="aesformer.progress"):
            bar = progress.Progress("sft", total=40, unit="steps", every_s=0.0)  # starts at t=0
            bar.set(10, "loss 1.2")  # first report at t=100, after 100 s of start-up
            bar.set(20, "loss 0.8")  # 10 more steps in 10 s
    finally:
        progress.time.perf_counter = real
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["sft: 10/40 steps (25%) · loss 1.2",
                     "sft: 20/40 steps (50%) · 1.00 steps/s · ETA 20s · loss 0.8"]

"""Shipping the code and the Ray bootstrap: the same job file runs locally
and through ``ray job submit`` on a cluster whose environment lacks the
project."""
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import PYTHON, REPO, bare_env, ray_head_without_project, run, submit_job

from aesformer.shipping import build_wheel


def test_wheel_holds_the_three_packages_under_their_import_names(tmp_path):
    wheel = build_wheel(REPO, tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "aesformer/config.py" in names
    assert "aesformer/actors/doctor.py" in names
    assert "aesformer/jobs/doctor.py" in names
    assert not any(n.startswith("platform/") for n in names)
    assert any(n.endswith(".dist-info/RECORD") for n in names)


def test_wheel_is_reused_until_the_sources_change(tmp_path):
    assert build_wheel(REPO, tmp_path) == build_wheel(REPO, tmp_path)


def test_repository_root_is_not_importable_as_platform():
    out = subprocess.run([PYTHON, "-c", "import platform; print(platform.system())"], cwd=REPO,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() in {"Linux", "Darwin", "Windows"}
    assert not (REPO / "platform" / "__init__.py").exists()


def test_job_file_imports_the_project_from_a_wheel_without_an_install(tmp_path):
    env_dir = bare_env(tmp_path / "venv")
    py = str(env_dir / "bin" / "python")
    assert subprocess.run([py, "-c", "import aesformer"], capture_output=True).returncode != 0
    code = ("import sys; sys.path.insert(0, 'jobs'); import _prelude; import aesformer.actors.doctor as d; "
            "print(d.__name__, '.whl' in d.__file__)")
    out = run([py, "-c", code], timeout=120)
    assert out.stdout.split() == ["aesformer.actors.doctor", "True"]


@pytest.mark.timeout(600)
def test_local_run_of_a_job_file(tmp_path):
    out = tmp_path / "doctor"
    run([PYTHON, "jobs/doctor.py", f"output={out}", "tracking.enabled=false", "ray.num_cpus=2"], timeout=300)
    report = json.loads((out / "doctor.json").read_text())
    assert report["ok"] is True
    assert report["actor"]["aesformer_from"] == "install"


@pytest.mark.timeout(900)
def test_ray_job_submit_to_a_cluster_without_the_project(tmp_path):
    """ray start --head from a bare environment; the job ships the code."""
    with ray_head_without_project(num_cpus=2) as head:
        out = tmp_path / "doctor"
        proc = submit_job(head, ["python", "jobs/doctor.py", f"output={out}"])
        assert "succeeded" in proc.stdout.lower() + proc.stderr.lower()
    report = json.loads((out / "doctor.json").read_text())
    assert report["ok"] is True
    # neither the driver nor the workers had the project installed
    assert report["driver"]["aesformer_from"] == "wheel"
    assert report["task"]["aesformer_from"] == "wheel"
    assert report["actor"]["aesformer_from"] == "wheel"
    # the run was tracked in the embedded MLflow store under output
    assert (out / "mlflow" / "mlflow.db").exists()

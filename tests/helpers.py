"""Helpers for tests that start processes: free ports, a Ray head without
the project installed, and subprocess runs with a timeout."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_env(folder: Path) -> Path:
    """A Python environment that sees every dependency but not this project.

    A venv made without pip whose site-packages holds one .pth line naming
    the main site-packages: .pth files found through that line (the editable
    install of this project among them) are not processed.
    """
    import venv

    venv.EnvBuilder(with_pip=False, symlinks=True).create(folder)
    py = folder / "bin" / "python"
    site = subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    import site as site_module

    # every site folder of this interpreter (a venv's and, with system site
    # packages, the base one's); .pth files inside them are not processed
    folders = list(dict.fromkeys(site_module.getsitepackages() + [sysconfig.get_paths()["purelib"]]))
    Path(site, "main-deps.pth").write_text("\n".join(folders) + "\n")
    return folder


@contextlib.contextmanager
def ray_head_without_project(num_cpus: int = 4) -> Iterator[dict]:
    """``ray start --head`` on 127.0.0.1 from an environment lacking the
    project; yields {"address", "dashboard", "env"} and stops it after."""
    with tempfile.TemporaryDirectory(prefix="aesf-bare-") as tmp:
        env_dir = bare_env(Path(tmp) / "venv")
        check = subprocess.run([str(env_dir / "bin" / "python"), "-c", "import aesformer"], capture_output=True)
        assert check.returncode != 0, "the bare environment must not see the project"
        port, dash = free_port(), free_port()
        env = dict(os.environ)
        env["PATH"] = f"{env_dir / 'bin'}:{env['PATH']}"
        env.pop("PYTHONPATH", None)
        env["RAY_AUTH_MODE"] = "token"
        env["VIRTUAL_ENV"] = str(env_dir)
        temp_dir = Path(tmp) / "ray"
        start = [str(env_dir / "bin" / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
                 f"--port={port}", f"--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                 f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                 f"--ray-client-server-port={free_port()}",
                 f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
        # the ray console script of the main environment, run by the bare python
        ray_main = [str(env_dir / "bin" / "python"), "-m", "ray.scripts.scripts"]
        log = open(Path(tmp) / "head.log", "w")
        head = subprocess.Popen(ray_main + start[1:] + ["--block"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_for_ray(ray_main, f"127.0.0.1:{port}", env, head, Path(tmp) / "head.log")
            wait_for_http(f"http://127.0.0.1:{dash}/api/version", head, Path(tmp) / "head.log")
            yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env,
                   "ray": ray_main, "temp_dir": temp_dir}
        finally:
            stop_tree(head, str(temp_dir))
            log.close()


def wait_for_ray(ray_main, address, env, head, log_path, timeout=180):
    import time

    t0 = time.time()
    while time.time() - t0 < timeout:
        if head.poll() is not None:
            raise AssertionError(f"ray start exited {head.returncode}: {Path(log_path).read_text()[-4000:]}")
        r = subprocess.run(ray_main + ["status", f"--address={address}"], env=env, capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            return
        time.sleep(2)
    raise AssertionError(f"Ray head did not come up in {timeout}s: {Path(log_path).read_text()[-4000:]}")


def wait_for_http(url, head, log_path, timeout=180):
    import time
    import urllib.error
    import urllib.request

    t0 = time.time()
    while time.time() - t0 < timeout:
        if head.poll() is not None:
            raise AssertionError(f"ray start exited {head.returncode}: {Path(log_path).read_text()[-4000:]}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except urllib.error.HTTPError:
            return  # it answers (auth may refuse the request): the server is up
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer in {timeout}s: {Path(log_path).read_text()[-4000:]}")


def stop_tree(proc: subprocess.Popen, marker: str) -> None:
    """Stop a process group and every process whose command line names
    ``marker`` (this cluster's temp dir), leaving other Ray clusters alone."""
    import signal
    import time

    import psutil

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    time.sleep(1)
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(marker in part for part in (p.info["cmdline"] or [])):
                p.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def run(cmd: list[str], timeout: int = 600, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command, fail with its output when it fails."""
    proc = subprocess.run(cmd, env=env, cwd=cwd or REPO, timeout=timeout, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


PYTHON = sys.executable


def submit_job(head: dict, entrypoint: list[str], timeout: int = 600, attempts: int = 40) -> subprocess.CompletedProcess:
    """``ray job submit --working-dir <repo> -- <entrypoint>`` to a head from
    ``ray_head_without_project``; retries while the head's job agent is still
    starting, fails with the job's logs otherwise."""
    import time

    cmd = head["ray"] + ["job", "submit", f"--address={head['dashboard']}", "--working-dir", str(REPO), "--"] + entrypoint
    for i in range(attempts):
        proc = subprocess.run(cmd, env=head["env"], cwd=REPO, timeout=timeout, capture_output=True, text=True)
        if proc.returncode == 0:
            return proc
        if "No available agent" not in proc.stderr + proc.stdout or i == attempts - 1:
            raise AssertionError(f"job submit exited {proc.returncode}\n--- stdout\n{proc.stdout[-8000:]}\n--- stderr\n{proc.stderr[-4000:]}")
        time.sleep(5)
    raise AssertionError("unreachable")


def local_cluster_module():
    """cluster/local_cluster.py, the multi-node cluster on one machine."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("local_cluster", REPO / "cluster" / "local_cluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("local_cluster", module)
    spec.loader.exec_module(module)
    return module


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    import time
    import urllib.error
    import urllib.request

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[:4]} exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer in {timeout}s: {log.read_text()[-3000:]}")


@contextlib.contextmanager
def s3_server(folder: Path, bucket: str = "aesformer") -> Iterator[dict]:
    """moto's S3 server on 127.0.0.1 with one bucket (tests/s3_endpoint.py);
    yields the environment a client needs (credentials and endpoint in
    environment variables, as boto3, pyarrow and MLflow read them), the
    bucket and the endpoint."""
    import signal

    port = free_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    log_path = folder / "moto.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([PYTHON, str(REPO / "tests" / "s3_endpoint.py"), str(port)], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True)
        try:
            _wait_http(f"http://127.0.0.1:{port}/", proc, log_path)
            import boto3

            boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], aws_access_key_id="testing",
                         aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=bucket)
            yield {"env": env, "bucket": bucket, "endpoint": env["AWS_ENDPOINT_URL_S3"]}
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@contextlib.contextmanager
def mlflow_server(folder: Path, artifacts: str, env: dict) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1: a SQLite backend in ``folder`` (the
    head's disk), artifacts proxied to ``artifacts`` (e.g. s3://bucket/mlflow).
    Yields its URI."""
    import signal

    port = free_port()
    log_path = folder / "mlflow-server.log"
    cmd = [PYTHON, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                start_new_session=True)
        try:
            _wait_http(f"http://127.0.0.1:{port}/health", proc, log_path, timeout=300)
            yield f"http://127.0.0.1:{port}"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

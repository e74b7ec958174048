"""A multi-node Ray cluster on one machine, whose nodes have their own disks.

A head node (no GPUs; the driver runs beside it) and worker nodes started
with ``ray start --address ...``, each worker inside its own mount namespace
(``unshare --mount``, needs root) with a private tmpfs over the folders a
node writes locally (``/tmp`` by default). What a worker node writes to its
local disk is invisible to the head and to the other workers, as on
separate machines. Each worker node carries a custom resource named after
it (``{"node_b": 100}``), so a pool can be pinned to it, e.g.
``learner.resources='{node_b: 1}'``.

A folder every node sees (``<root>/shared``, outside the private folders)
stands for a shared filesystem.

    python cluster/local_cluster.py                    # head + node_b + node_c, 4 CPUs each
    python cluster/local_cluster.py --workers 3 --worker-cpus 2 --head-gpus 0

It prints the address and the environment a client needs, then waits until
Ctrl-C and stops only the processes it started (by process group and by its
own temp-dir marker; never ``ray stop``, which would stop every cluster on
the machine). Only the standard library and psutil are needed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional, Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def namespaces_available() -> tuple[bool, str]:
    """Whether this process can start a node in its own mount namespace with
    a private tmpfs; the reason when it cannot."""
    if not sys.platform.startswith("linux"):
        return False, f"mount namespaces need Linux (this is {sys.platform})"
    if shutil.which("unshare") is None:
        return False, "the unshare command (util-linux) is not installed"
    with tempfile.TemporaryDirectory(prefix="aesf-ns-check-") as d:
        try:
            proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                   f"mount -t tmpfs tmpfs {d} && touch {d}/x"],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return False, f"unshare --mount failed: {e}"
        if proc.returncode != 0:
            return False, f"unshare --mount with a tmpfs failed (root needed): {proc.stderr.strip()[:200]}"
        if Path(d, "x").exists():
            return False, "a tmpfs mounted inside unshare --mount leaked to the parent namespace"
    return True, ""


def _ports_args() -> list[str]:
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            "--min-worker-port=0", "--max-worker-port=0"]


class LocalCluster:
    """Start with :meth:`start` (or use as a context manager), stop with :meth:`stop`.

    ``workers`` maps a node name to its CPUs and GPUs (logical: GPUs may be
    declared on a machine without any, for placement checks). Each worker
    node gets the custom resource ``{name: 100}``.
    """

    def __init__(self, workers: Optional[dict] = None, *, head_cpus: int = 1, head_gpus: int = 0,
                 head_resources: Optional[dict] = None, private: Sequence[str] = ("/tmp",),
                 root: Optional[str] = None, python: str = sys.executable, env: Optional[dict] = None,
                 startup_nice: int = 0, dashboard: bool = False):
        self.workers = workers if workers is not None else {"node_b": {"num_cpus": 4}, "node_c": {"num_cpus": 4}}
        self.head_cpus, self.head_gpus = head_cpus, head_gpus
        self.head_resources = head_resources or {}
        self.private = [str(Path(p)) for p in private]
        self.python = python
        # A raylet gives its agents a fixed 15 s to report their ports and aborts
        # otherwise, which a busy machine can miss (a failed start is retried): as
        # root, a node may start at a negative niceness, put back to 0 once it is up
        # (workers started later inherit 0). Off by default.
        self.startup_nice = startup_nice
        # the dashboard (needed by `ray job submit`, not by drivers that join with
        # ray.address) is a dozen more processes starting with the head
        self.with_dashboard = dashboard
        self.marker = f"aesf-cluster-{uuid.uuid4().hex[:8]}"
        base = Path(root) if root else Path("/var/tmp")
        self.root = base / self.marker
        for p in self.private:
            if self.root == Path(p) or Path(p) in self.root.parents:
                raise ValueError(f"the cluster folder {self.root} must lie outside the private folders {self.private}")
        self.shared = self.root / "shared"
        self.port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = dict(os.environ if env is None else env)
        self.env["RAY_AUTH_MODE"] = "token"
        # a raylet waits a fixed time for its agents to start and report their ports,
        # which a busy machine running several nodes at once can exceed
        self.env.setdefault("RAY_agent_register_timeout_ms", "120000")
        self.env.setdefault("RAY_raylet_start_wait_time_s", "120")
        if not dashboard:
            self.env["LOCAL_CLUSTER_MINIMAL_AGENT"] = "1"
        self.env.pop("RAY_ADDRESS", None)
        self.procs: dict[str, subprocess.Popen] = {}
        self.lost: set[str] = set()
        self._logs: list = []

    # -- start -------------------------------------------------------------------------
    def _ray(self) -> list[str]:
        return [self.python, "-c", _PATIENT_RAY_START]

    def _popen(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        self._logs.append(log)
        if self.startup_nice and os.geteuid() == 0:
            cmd = ["nice", "-n", str(self.startup_nice)] + cmd
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start(self, timeout: float = 180) -> "LocalCluster":
        self.root.mkdir(parents=True)
        self.shared.mkdir()
        head = self._ray() + [
            "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--include-dashboard={'true' if self.with_dashboard else 'false'}",
            f"--ray-client-server-port={free_port()}", f"--num-cpus={self.head_cpus}", f"--num-gpus={self.head_gpus}",
            f"--resources={json.dumps({'head': 100, **self.head_resources})}",
            f"--temp-dir={self._temp('head')}", "--disable-usage-stats"] + _ports_args()
        try:
            self._with_retries("head", lambda: self._popen("head", head), 1, timeout)
            for i, (name, spec) in enumerate(self.workers.items()):
                self._with_retries(name, lambda: self._start_worker(name, spec), 2 + i, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _with_retries(self, name: str, start, nodes: int, timeout: float, attempts: int = 5) -> None:
        """Start a node and wait until ``nodes`` are alive. Ray gives a raylet
        a fixed 30 s to register, which a loaded machine can miss: a node
        that exits during start-up is started again (fresh ports)."""
        for attempt in range(attempts):
            start()
            try:
                self.wait_for_nodes(nodes, timeout)
                _normal_priority(self._temp(name))
                return
            except RuntimeError:
                if attempt == attempts - 1 or self.procs[name].poll() is None:
                    raise
                os.replace(self.root / f"{name}.log", self.root / f"{name}.failed-{attempt}.log")
                _kill_marked(self._temp(name))

    def _temp(self, name: str) -> str:
        if name == "head":
            return str(self.root / "head")
        return f"/tmp/{self.marker}-{name}" if "/tmp" in self.private else str(self.root / name)

    def _start_worker(self, name: str, spec: dict) -> None:
        temp = self._temp(name)
        resources = {name: 100, **spec.get("resources", {})}
        start = self._ray() + [
            "start", "--block", f"--address={self.address}", "--node-ip-address=127.0.0.1",
            f"--num-cpus={spec.get('num_cpus', 2)}", f"--num-gpus={spec.get('num_gpus', 0)}",
            f"--resources={json.dumps(resources)}", f"--temp-dir={temp}", "--disable-usage-stats"] + _ports_args()
        mounts = " && ".join(f"mkdir -p {p} && mount -t tmpfs -o size=4g,mode=1777 aesf-{name} {p}"
                             for p in self.private)
        script = f"{mounts} && exec {' '.join(_quote(a) for a in start)}"
        self._popen(name, ["unshare", "--mount", "--propagation", "private", "sh", "-c", script])

    def wait_for_nodes(self, count: int, timeout: float = 180) -> None:
        """Until the first ``count`` nodes started have registered (``ray start``
        logs "Ray runtime started" once its node is in the GCS)."""
        t0 = time.time()
        names = list(self.procs)[:count]
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None and name not in self.lost:
                    raise RuntimeError(f"node {name} exited {proc.returncode}: {self.log(name)[-3000:]}")
            if all("Ray runtime started" in self.log(name) for name in names):
                return
            if time.time() - t0 > timeout:
                raise TimeoutError(f"{count} nodes did not come up in {timeout:.0f}s; logs: "
                                   + " | ".join(f"{n}: {self.log(n)[-1500:]}" for n in names))
            time.sleep(1)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- inside a node -----------------------------------------------------------------
    def node_pid(self, name: str) -> int:
        """A process inside the node's mount namespace (its ``ray start``)."""
        return self.procs[name].pid

    def in_node(self, name: str, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Run ``cmd`` in node ``name``'s mount namespace (what that node's disk holds)."""
        if name == "head":
            return subprocess.run(cmd, capture_output=True, text=True, **kwargs)
        return subprocess.run(["nsenter", f"--mount=/proc/{self.node_pid(name)}/ns/mnt"] + cmd,
                              capture_output=True, text=True, **kwargs)

    def processes(self, name: str, pattern: str) -> list[int]:
        """PIDs of the processes inside node ``name``'s mount namespace whose
        command line contains ``pattern`` (e.g. a Ray worker's ``ray::RayTrainWorker``)."""
        import psutil

        ns = os.readlink(f"/proc/{self.node_pid(name)}/ns/mnt")
        found = []
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error, OSError):
                if pattern in " ".join(p.info["cmdline"] or []) and os.readlink(f"/proc/{p.pid}/ns/mnt") == ns:
                    found.append(p.pid)
        return found

    def kill_node(self, name: str) -> None:
        """Lose node ``name`` at once: SIGKILL its raylet, workers and agents, by PID (every
        process inside its mount namespace) and by process group. Workers run in process
        groups of their own and notice a dead raylet only after a while: a training worker
        spared by a group kill would go on taking steps."""
        proc = self.procs[name]
        inside = self.processes(name, "")
        self.lost.add(name)
        for pid in inside:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        _kill_marked(f"{self.marker}-{name}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)

    def restart_node(self, name: str, timeout: float = 300) -> None:
        """Bring a lost worker node back (a new node with the same name,
        resources and an empty private disk), as a cluster manager replaces
        a failed machine; waits until it has registered."""
        if name not in self.lost:
            raise ValueError(f"node {name} is not lost")
        old = self.root / f"{name}.log"
        if old.exists():
            os.replace(old, self.root / f"{name}.lost-{len(list(self.root.glob(f'{name}.lost-*')))}.log")
        self.lost.discard(name)
        order = list(self.procs)
        self._with_retries(name, lambda: self._start_worker(name, self.workers[name]), order.index(name) + 1, timeout)

    # -- stop ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop this cluster's processes only: process groups, then whatever still names the marker."""
        for proc in reversed(list(self.procs.values())):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 10
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.time()))
        _kill_marked(self.marker)
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for log in self._logs:
            log.close()

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.cleanup()


# ``ray start`` gives a new node a fixed 30 s to register with the GCS; on a
# machine busy enough (several nodes start at once, other work runs) its
# agents take longer to come up. This runs ``ray start`` with the lookup of
# its own node retried for up to RAY_NODE_REGISTER_WAIT_S (default 60 s).
# Without a dashboard, each node's dashboard agent runs in its minimal form,
# which starts in a fraction of the time.
_PATIENT_RAY_START = """
import os, sys, time
import ray._private.services as services
_get_node = services.get_node
def _patient_get_node(*args, **kwargs):
    deadline = time.monotonic() + float(os.environ.get("RAY_NODE_REGISTER_WAIT_S", "60"))
    while True:
        try:
            return _get_node(*args, **kwargs)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
services.get_node = _patient_get_node
if os.environ.get("LOCAL_CLUSTER_MINIMAL_AGENT") == "1":
    # the node's dashboard agent in its minimal form (no HTTP server and
    # modules), as Ray starts it when the dashboard's dependencies are absent
    import ray._private.utils as utils
    utils.get_dashboard_dependency_error = lambda: "minimal agent asked for"
from ray.scripts.scripts import main
sys.argv[0] = "ray"
main()
"""


def _normal_priority(marker: str) -> None:
    """Niceness 0 for every process whose command line names ``marker``."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(marker in part for part in (p.info["cmdline"] or [])) and p.nice() != 0:
                p.nice(0)


def _kill_marked(marker: str) -> None:
    import psutil

    me = os.getpid()
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if p.pid != me and any(marker in part for part in (p.info["cmdline"] or [])):
                p.kill()


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


@contextlib.contextmanager
def local_cluster(**kwargs) -> Iterator[LocalCluster]:
    with LocalCluster(**kwargs) as cluster:
        yield cluster


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2, help="worker nodes (node_b, node_c, ...)")
    p.add_argument("--worker-cpus", type=int, default=4)
    p.add_argument("--worker-gpus", type=int, default=0, help="logical GPUs declared per worker node")
    p.add_argument("--head-cpus", type=int, default=1)
    p.add_argument("--head-gpus", type=int, default=0)
    p.add_argument("--private", nargs="*", default=["/tmp"], help="folders each worker node gets a private tmpfs over")
    p.add_argument("--no-dashboard", action="store_true", help="no dashboard (then no `ray job submit`)")
    args = p.parse_args(argv)
    ok, why = namespaces_available()
    if not ok:
        raise SystemExit(f"cannot start worker nodes in their own mount namespaces: {why}")
    names = [f"node_{chr(ord('b') + i)}" for i in range(args.workers)]
    cluster = LocalCluster({n: {"num_cpus": args.worker_cpus, "num_gpus": args.worker_gpus} for n in names},
                           head_cpus=args.head_cpus, head_gpus=args.head_gpus, private=args.private,
                           dashboard=not args.no_dashboard)
    cluster.start()
    print(f"cluster up: head + {', '.join(names)}\n"
          f"  address:   {cluster.address}"
          + (f"   dashboard: {cluster.dashboard} (RAY_AUTH_MODE=token ray job submit --address ...)\n"
             if cluster.with_dashboard else "\n") +
          f"  shared:    {cluster.shared}   (every node sees it; {', '.join(args.private)} are private per node)\n"
          f"  try:       RAY_AUTH_MODE=token python jobs/grpo_a.py ray.address={cluster.address} "
          f"output={cluster.shared}/grpo tracking.enabled=false learner.resources='{{{names[0]}: 1}}'\n"
          f"Ctrl-C stops it.", flush=True)
    try:
        while all(proc.poll() is None for proc in cluster.procs.values()):
            time.sleep(2)
        print("a node exited; stopping the cluster", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        cluster.cleanup()


if __name__ == "__main__":
    main()

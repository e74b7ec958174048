"""Benchmark: VCMP throughput, stage balance and memory at two corpus sizes.

Generates synthetic tutorial videos (make_samples), then mines the first
``small`` and then ``large`` of them with the tiny profile in one Ray
session, each into a fresh output, while a sampler thread records the peak
memory (summed RSS) of this process and every process it started (the local Ray: raylet, workers, actors). Prints one JSON line:

- per size: job wall time, pipeline wall time, sampled frames and frames/s,
  per-stage busy time (Ray Data task wall and CPU time), the fraction of
  sampled frames that reached the VLM, peak memory;
- ``efficiency``: sum of stage busy time ÷ cores ÷ pipeline wall time
  (the budget is ≥ 0.6), and ``efficiency_cpu`` the same with the stages'
  CPU time; ``cpu_by_role_s``: the CPU seconds of every process of the job
  (driver, each stage's workers, Ray's own processes) and ``job_cpu_share``
  their sum ÷ cores ÷ job wall time; the number of processes (at the memory
  peak and at most) and the 1-minute load average before and after (the
  machine may be shared: a figure means little without it);
- ``memory_ratio``: peak memory at ``large`` ÷ at ``small`` (the budget is
  that it does not grow: ≤ 1.15).

    python tests/benchmarks/vcmp.py [small=10] [large=40] [samples=<dir>] [key=value ...]

Extra ``key=value`` arguments go to the vcmp job config.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs"))

EFFICIENCY_BUDGET = 0.6
MEMORY_GROWTH_BUDGET = 1.15


def role(p) -> str:
    """What a process of the local Ray is: the driver, a Ray Data worker of a
    stage, an idle worker, or Ray's own system processes."""
    try:
        cmd = " ".join(p.cmdline())[:300]
        name = p.name()
    except Exception:
        return "?"
    if p.pid == os.getpid():
        return "driver"
    if "MapWorker" in name or "MapWorker" in cmd:
        return "actor:" + (cmd.split("MapBatches(")[-1].split(")")[0] if "MapBatches(" in cmd else name)
    if name.startswith("ray::"):
        return "worker:" + name[5:40]
    for sys_name in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor", "runtime_env", "agent"):
        if sys_name in cmd:
            return "ray:" + sys_name
    return "other:" + name[:30]


class PeakMemory:
    """Samples the summed RSS of this process and all its descendants (RSS
    counts shared libraries once per process, the same way at every size;
    PSS would be exact but reading smaps costs ~0.2 s per process)."""

    def __init__(self, interval: float = 0.25):
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.peak = 0
        self.processes = 0  # processes counted at the peak
        self.most_processes = 0
        self.cpu: dict[int, tuple[str, float]] = {}  # pid → (role, CPU seconds last seen)
        self.cpu_at_start: dict[int, float] = {}
        self.roles: dict[int, tuple[str, float]] = {}  # pid → (role, when it was read)
        self._first = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[int, int]:
        import psutil

        total, n = 0, 0
        now = time.monotonic()
        for p in [self.me] + self.me.children(recursive=True):
            try:
                total += p.memory_info().rss
                t = p.cpu_times()
                if p.pid not in self.cpu:  # processes already there at the start count from then on
                    self.cpu_at_start[p.pid] = t.user + t.system if self._first else 0.0
                self.cpu[p.pid] = (self._role(p, now), t.user + t.system)
                n += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return total, n

    def _role(self, p, now: float) -> str:
        """The process's role, read again at most once a second (the sampler
        should cost the machine little); a worker keeps the role it had while
        it ran a stage, not the idle one it has between tasks."""
        last, seen = self.roles.get(p.pid, ("?", -1.0))
        if now - seen < 1.0:
            return last
        current = role(p)
        if current in ("worker:IDLE", "?") and last not in ("worker:IDLE", "?"):
            current = last
        self.roles[p.pid] = (current, now)
        return current

    def _update(self) -> None:
        total, n = self.sample()
        self._first = False
        self.most_processes = max(self.most_processes, n)
        if total > self.peak:
            self.peak, self.processes = total, n

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds used during the run by this process tree, by role
        (processes that ended between two samples count up to their last sample)."""
        out: dict[str, float] = {}
        for pid, (r, sec) in self.cpu.items():
            out[r] = round(out.get(r, 0.0) + sec - self.cpu_at_start.get(pid, 0.0), 2)
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            self._update()
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._update()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def mine(videos: list[Path], out: Path, extra: list[str]) -> dict:
    from aesformer.jobs.vcmp import main

    listing = out.parent / f"{out.name}.txt"
    listing.write_text("".join(f"{v}\n" for v in videos))
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    with PeakMemory() as mem:
        res = main([f"input={listing}", f"output={out}", "tracking.enabled=false", *extra])
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()[0]
    f = res["funnel"]
    frames = next(s["out"] for s in f["stages"] if s["stage"] == "sample")
    times = res["stage_times"]
    busy_wall = sum(v["wall_s"] for k, v in times.items() if k != "FromArrow")
    busy_cpu = sum(v["cpu_s"] for k, v in times.items() if k != "FromArrow")
    cores = os.cpu_count() or 1
    pw = max(1e-9, res["pipeline_wall_s"])
    return {
        "videos": len(videos), "pairs": res["pairs"], "wall_s": round(wall, 2), "pipeline_wall_s": round(pw, 2),
        "frames": frames, "frames_per_s": round(frames / pw, 2),
        "stage_busy_s": {k: v["wall_s"] for k, v in times.items()},
        "stage_cpu_s": {k: v["cpu_s"] for k, v in times.items()},
        "vlm_fraction": f["vlm_fraction"],
        "peak_memory_mb": round(mem.peak / 2 ** 20, 1), "processes_at_peak": mem.processes,
        "processes_max": mem.most_processes,
        "efficiency": round(busy_wall / cores / pw, 3),
        "efficiency_cpu": round(busy_cpu / cores / pw, 3),
        # where the job's CPU went (all its processes, whole job), and what the machine's load was
        "cpu_by_role_s": dict(sorted(mem.cpu_by_role().items(), key=lambda kv: -kv[1])),
        "cpu_all_s": round(sum(mem.cpu_by_role().values()), 2), "job_cpu_share": round(
            sum(mem.cpu_by_role().values()) / cores / max(1e-9, wall), 3),
        "loadavg_1m": [round(load0, 2), round(load1, 2)],
    }


def main(argv: list[str]) -> dict:
    import logging

    from aesformer.cluster import init_ray, shutdown_ray
    from aesformer.config import RayConfig
    from aesformer.jobs.make_samples import main as make_samples

    opts = {"small": "10", "large": "40", "samples": ""}
    extra = []
    for a in argv:
        k, _, v = a.partition("=")
        if k in opts:
            opts[k] = v
        else:
            extra.append(a)
    small, large = int(opts["small"]), int(opts["large"])
    tmp = Path(tempfile.mkdtemp(prefix="vcmp-bench-"))
    samples = Path(opts["samples"]) if opts["samples"] else tmp / "samples"
    t0 = time.perf_counter()
    if not (samples / "manifest.jsonl").exists() or len((samples / "manifest.jsonl").read_text().splitlines()) < large:
        make_samples([f"output={samples}", f"videos={large}", "tracking.enabled=false"])
    make_s = time.perf_counter() - t0
    rows = [json.loads(x) for x in (samples / "manifest.jsonl").read_text().splitlines()]
    videos = [samples / r["file"] for r in rows if r["video_id"].startswith("tut")][:large]
    logging.getLogger().setLevel(logging.WARNING)
    init_ray(RayConfig(num_cpus=8, ship_code=False))
    try:
        res_small = mine(videos[:small], tmp / f"out{small}", extra)
        res_large = mine(videos[:large], tmp / f"out{large}", extra)
    finally:
        shutdown_ray()
    out = {
        "benchmark": "vcmp", "cores": os.cpu_count(), "make_samples_s": round(make_s, 1),
        str(small): res_small, str(large): res_large,
        "memory_ratio": round(res_large["peak_memory_mb"] / max(1e-9, res_small["peak_memory_mb"]), 3),
        "efficiency": res_large["efficiency"], "efficiency_cpu": res_large["efficiency_cpu"],
        "budgets": {"efficiency_min": EFFICIENCY_BUDGET, "memory_ratio_max": MEMORY_GROWTH_BUDGET},
    }
    out["ok"] = bool(out["efficiency"] >= EFFICIENCY_BUDGET and out["memory_ratio"] <= MEMORY_GROWTH_BUDGET)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])

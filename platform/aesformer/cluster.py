"""Ray bootstrap shared by every job.

``init_ray(cfg.ray)`` connects to ``ray.address`` (or RAY_ADDRESS, which
``ray job submit`` sets) when given, else starts a local Ray on 127.0.0.1
sized to this machine. When it joins an existing cluster, or when this
process imported ``aesformer`` from a built wheel rather than an install, it
ships the project's code to the workers as a wheel in ``py_modules``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

# Environment every worker gets: one torch thread is ~35x faster for tiny
# models on small machines, and it avoids oversubscription on large ones.
# Hugging Face's offline mode is the user's choice: it reaches the workers
# only when the driver's environment sets it (a hub id then never downloads).
def worker_env(threads: int = 1) -> dict[str, str]:
    env = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    }
    for name in ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def use_worker_threads(threads: Optional[int] = None) -> None:
    """Give torch in this process ``threads`` threads (0: one per core of
    the node, for a process that has the machine to itself while it works),
    by default the count :func:`worker_env` set."""
    import torch

    if threads == 0:
        threads = os.cpu_count() or 1
    torch.set_num_threads(max(1, int(threads or os.environ.get("OMP_NUM_THREADS", "1"))))


def _package_is_installed() -> bool:
    import aesformer

    return not any(part.endswith(".whl") for part in Path(aesformer.__file__).parts)


def runtime_env(ray_cfg: Any, ship: bool) -> dict:
    env: dict = {"env_vars": worker_env(getattr(ray_cfg, "worker_threads", 1))}
    if ship:
        from aesformer.shipping import build_wheel

        env["py_modules"] = [str(build_wheel())]
    return env


LOCAL_START_ATTEMPTS = 3


def init_ray(ray_cfg: Any, *, extra_env: Optional[dict] = None):
    """Connect to or start Ray once per process; returns the ``ray`` module."""
    import ray

    if ray.is_initialized():
        return ray
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    joining = bool(address) and address != "local"
    ship = ray_cfg.ship_code and (joining or not _package_is_installed())
    env = runtime_env(ray_cfg, ship)
    if extra_env:
        env["env_vars"].update(extra_env)
    # the workers' output reaches the console only with log_level=debug; it
    # always stays in Ray's session logs (linked from <output>/logs/ray)
    verbose = os.environ.get("AESFORMER_LOG_LEVEL", "info") == "debug"
    kwargs: dict = dict(runtime_env=env, log_to_driver=verbose, logging_level=logging.WARNING)
    if joining:
        log.info("joining Ray cluster at %s (shipping code: %s)", address, ship)
        ray.init(address=address, **kwargs)
    else:
        num_cpus = ray_cfg.num_cpus or os.cpu_count() or 1
        log.info("starting a local Ray with %s CPUs", num_cpus)
        # One machine of its own: nothing preempts it, so Ray Train's preemption
        # watcher would only be one more process to start per training run. Idle
        # workers started ahead would lack the jobs' runtime environment and go
        # unused, so none are.
        kwargs["runtime_env"]["env_vars"].setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        kwargs["_system_config"] = {"prestart_worker_first_driver": False, "enable_worker_prestart": False}
        for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
            try:
                ray.init(address="local", num_cpus=num_cpus, num_gpus=ray_cfg.num_gpus, include_dashboard=False,
                         _node_ip_address="127.0.0.1", **kwargs)
                break
            except Exception as e:
                # Ray gives its raylet a fixed 30 s to register; on a machine busy
                # with other work that is not always enough, and a second try is
                if "timed out during startup" not in str(e) or attempt == LOCAL_START_ATTEMPTS:
                    raise
                log.warning("the local Ray did not start within Ray's 30 s (is the machine busy? load average "
                            "%.1f); trying again (%d of %d)", os.getloadavg()[0], attempt + 1, LOCAL_START_ATTEMPTS)
                ray.shutdown()
    if not verbose:
        from ray.data import DataContext
        from ray.util.debug import log_once

        # jobs draw one progress line per phase instead of one bar per operator
        DataContext.get_current().enable_progress_bars = False
        log_once("ray_data_progress_manager_disabled")  # Ray Data's notice that they are off: said once, here
        for handler in logging.getLogger("ray.data").handlers:
            if "File" not in type(handler).__name__:
                handler.setLevel(logging.WARNING)  # its execution plans stay in Ray's session log
    return ray


def session_logs() -> Optional[Path]:
    """The log folder of this process's Ray session when it runs on this machine."""
    import ray

    if not ray.is_initialized():
        return None
    try:  # Ray has no public call for it; the driver's node knows its session folder
        folder = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    except Exception:
        return None
    return folder if folder.is_dir() else None


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def object_store_created_bytes() -> Optional[int]:
    """Bytes ever created in the object store of the connected Ray cluster,
    summed over its nodes (a counter: take differences), or None where this
    Ray version does not report it."""
    try:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
        return int(reply.store_stats.cumulative_created_bytes)
    except Exception:
        return None

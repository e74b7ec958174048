"""Probes that tell what a Ray worker sees: the code version it imported,
its Python and torch, and its accelerators. Used by ``jobs/doctor.py``."""
from __future__ import annotations

import os
import platform
import socket
import sys

import ray


def describe_worker() -> dict:
    import aesformer

    info = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "aesformer_version": aesformer.__version__,
        # a shipped wheel is imported from the zip (driver) or from Ray's
        # unpacked copy of it (workers); an install from site-packages or source
        "aesformer_from": "wheel" if (".whl" in aesformer.__file__ or "py_modules_files" in aesformer.__file__)
        else "install",
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_devices"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        info["torch"] = None
        info["cuda_devices"] = 0
    return info


@ray.remote(num_cpus=0.1)
def probe_task() -> dict:
    return describe_worker()


def matmul_checksum(n: int = 64, seed: int = 0) -> float:
    """trace(A·Aᵀ) of a seeded random n×n matrix: the same number wherever torch computes it."""
    import torch

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g)
    return float((a @ a.T).trace())


@ray.remote(num_cpus=0.1)
class NodeProbe:
    """A long-lived probe: checks that actors (not only tasks) import the
    project, and that a small tensor computation runs where they live."""

    def describe(self) -> dict:
        return describe_worker()

    def matmul_checksum(self, n: int = 64, seed: int = 0) -> float:
        return matmul_checksum(n, seed)

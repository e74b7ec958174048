"""Shared test set-up: one torch thread, no hub, tiny models built once."""
import os

# Before torch is imported anywhere: one thread is much faster on small CPUs.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import pytest  # noqa: E402


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_report_header(config):
    """The machine and the numeric libraries: results that differ between
    machines are read against these."""
    import platform

    line = f"machine: {platform.machine()}, {os.cpu_count()} cores"
    try:
        import torch
        import transformers

        line += (f"; torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
                 f"transformers {transformers.__version__}")
    except Exception as exc:  # the header must never stop a run
        line += f"; torch not importable ({exc})"
    return line


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models():
    """Paths of the tiny offline models, built once per machine and cached."""
    import torch

    torch.set_num_threads(1)
    from aesformer.tiny import ensure_tiny_models

    return ensure_tiny_models()

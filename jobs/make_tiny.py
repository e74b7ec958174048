"""Build the tiny offline models (tokenizer, thinker, judge, editor, whisper).

Randomly initialised models of the real classes (Qwen3-VL, Qwen2.5-VL,
Qwen-Image-Edit, Whisper) with a tokenizer trained here, saved in the
standard transformers/diffusers layout so the real loading code reads them.
No network, a few MB each, identical for the same seed. Jobs on the tiny
profile do not need this: ``tiny:<name>`` models are built on first use and
cached (``aesformer.tiny.ensure_tiny_models``); this job writes them where
you want them, e.g. to inspect or ship to a cluster.

    python jobs/make_tiny.py output=runs/tiny-models which=[thinker,judge]
"""
from __future__ import annotations

if __package__ in (None, ""):
    import _prelude  # noqa: F401  (makes aesformer importable when run as a script)

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from aesformer.config import JobConfig
from aesformer.job import run_job

log = logging.getLogger("make_tiny")


@dataclass
class MakeTinyConfig(JobConfig):
    output: str = "runs/tiny-models"
    # seed 0 gives the same models as the tiny:<name> cache
    seed: int = 0
    which: list[str] = field(default_factory=lambda: ["thinker", "judge", "editor", "whisper"])


def run(cfg: MakeTinyConfig) -> dict:
    """Writes output/<model>/ for each model in ``which`` plus output/tokenizer/;
    returns their paths, sizes (MB) and the build time."""
    import torch

    from aesformer.tiny import MODEL_KEYS, _dir_mb, build_tiny_models

    unknown = [k for k in cfg.which if k not in MODEL_KEYS]
    if unknown:
        raise ValueError(f"which: unknown model(s) {unknown}; choose from {list(MODEL_KEYS)}")
    torch.set_num_threads(1)  # tiny models: one thread is much faster
    t0 = time.perf_counter()
    paths = build_tiny_models(cfg.output, seed=cfg.seed, which=cfg.which)
    seconds = time.perf_counter() - t0
    sizes = {k: round(_dir_mb(Path(p)), 2) for k, p in paths.items()}
    for k, p in paths.items():
        log.info("%-9s %6.2f MB  %s", k, sizes[k], p)
    log.info("built %d models in %.1fs", len(cfg.which), seconds)
    return {"output": cfg.output, "paths": paths, "size_mb": sizes, "build_s": round(seconds, 2)}


def main(argv=None) -> dict:
    return run_job(MakeTinyConfig, "make_tiny", run, argv)


if __name__ == "__main__":
    main()

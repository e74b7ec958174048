"""Human ratings for an evaluation: a page on 127.0.0.1 where raters pick
the better of two photos (a system's output and the poor or good photo,
sides at random, the system hidden). Votes go to the evaluation's SQLite
file; rerun ``jobs/evaluate.py`` with the same output to add human win
rates and judge-human agreement (Cohen's kappa) to the report.

    python jobs/rate.py study=runs/evaluate            # prints the URL; Ctrl-C stops it
    python jobs/rate.py study=runs/evaluate port=8899
"""
from __future__ import annotations

if __package__ in (None, ""):
    import _prelude  # noqa: F401  (makes aesformer importable when run as a script)

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from aesformer.config import ConfigError, JobConfig
from aesformer.job import run_job

log = logging.getLogger("rate")


@dataclass
class RateConfig(JobConfig):
    output: str = "runs/rate"        # where this job's resolved config is written
    study: Optional[str] = None      # an evaluate job's output folder
    host: str = "127.0.0.1"
    port: int = 0                    # 0: a free port (printed)


def check_inputs(cfg: RateConfig) -> None:
    if not cfg.study:
        raise ConfigError("study= is required: an evaluate job's output folder")
    if not (Path(cfg.study).expanduser() / "pairs.json").exists():
        raise ConfigError(f"study='{cfg.study}' has no pairs.json: run jobs/evaluate.py with output={cfg.study} first")


def serve(cfg: RateConfig):
    """The rating server, started (in a thread); ``server.url`` is its address."""
    from aesformer.evaluation.rating import RatingServer
    from aesformer.evaluation.store import open_store

    check_inputs(cfg)
    study = Path(cfg.study).expanduser()
    pairs = json.loads((study / "pairs.json").read_text())
    return RatingServer(open_store(study), pairs, host=cfg.host, port=cfg.port, seed=cfg.seed).start()


def run(cfg: RateConfig) -> None:
    server = serve(cfg)
    print(f"rating page: {server.url}  ({len(server.pairs)} pairs; Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def main(argv=None) -> None:
    run_job(RateConfig, "rate", run, argv, check=check_inputs)


if __name__ == "__main__":
    main()

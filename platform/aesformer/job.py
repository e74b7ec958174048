"""What every job does first: resolve its config, prepare ``output``, log."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Type, TypeVar

from aesformer.config import ConfigError, JobConfig, load_config, to_yaml

T = TypeVar("T", bound=JobConfig)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("urllib3", "filelock", "alembic", "httpx", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def setup(schema: Type[T], job: str, argv: Optional[Sequence[str]] = None) -> T:
    """Resolve the config (exit 2 with the problem on a bad one), create
    ``output``, write ``output/config.yaml`` and log the resolved config."""
    setup_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(schema, job, argv)
    except ConfigError as e:
        print(f"{job}: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(cfg.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    cfg.output = str(out.resolve())
    text = to_yaml(cfg)
    (out / "config.yaml").write_text(text)
    logging.getLogger(job).info("resolved config:\n%s", text)
    return cfg

"""How every job runs: resolve the config, check the inputs, prepare
``output`` and its logs, run, and turn a problem the user can fix into one
line on stderr and exit status 2.

    def main(argv=None) -> dict:
        return run_job(MyConfig, "my_job", run, argv, check=check_inputs)

``check`` runs before anything is created or started (no output folder, no
Ray, no MLflow), so a bad input leaves nothing behind.

The console stays quiet by default (``log_level=info``): the jobs' own
progress lines and warnings. The full record (the resolved config, every
library's log lines) goes to ``output/logs/<job>.log``, and the Ray
workers' logs stay in Ray's session folder, linked as ``output/logs/ray``
for a local Ray. ``log_level=debug`` shows everything on the console,
workers included; ``log_level=warning`` shows only what needs attention.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Type, TypeVar

from aesformer.config import ConfigError, JobConfig, load_config, to_yaml

T = TypeVar("T", bound=JobConfig)

# Jobs whose output may be a URI of a pyarrow filesystem (s3://, gs://, hdfs://)
URI_OUTPUTS = ("sft", "grpo_a", "editor_lora", "vcmp", "distill")

LOG_LEVELS = ("debug", "info", "warning")
# Libraries whose INFO lines are for the log file, not the console.
CHATTY = ("ray", "urllib3", "filelock", "alembic", "httpx", "PIL", "mlflow", "DeepSpeed", "deepspeed",
          "torch", "transformers", "diffusers", "matplotlib", "asyncio", "fsspec", "numexpr")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str = "info", log_file: Optional[Path] = None) -> None:
    """The console at ``level`` (libraries at WARNING unless debug), the file
    (when given) at INFO for everything."""
    if level not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got '{level}'")
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_aesformer", False):
            root.removeHandler(h)
            h.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    console.setLevel(logging.DEBUG if level == "debug" else logging.INFO if level == "info" else logging.WARNING)
    if level != "debug":
        console.addFilter(_quiet_libraries)
    console._aesformer = True  # type: ignore[attr-defined]
    root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file)
        to_file.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        to_file.setLevel(logging.INFO)
        to_file._aesformer = True  # type: ignore[attr-defined]
        root.addHandler(to_file)
    root.setLevel(logging.DEBUG if level == "debug" else logging.INFO)
    logging.captureWarnings(True)
    if level == "debug":
        for name in CHATTY:
            logging.getLogger(name).setLevel(logging.DEBUG)
    else:
        # torch attaches a console handler of its own (its compile summary at exit)
        logging.getLogger("torch").setLevel(logging.WARNING)
        # notices that need no action: DeepSpeed picking its CPU accelerator, Ray's
        # token authentication being on, MLflow creating its tables
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # save_pretrained's shard bars
    os.environ["AESFORMER_LOG_LEVEL"] = level


def _quiet_libraries(record: logging.LogRecord) -> bool:
    """On the console, libraries speak only to warn."""
    if getattr(record, "detail", False) or record.name == "py.warnings":
        return False  # per-item detail and libraries' deprecation notices go to the file
    if record.levelno >= logging.WARNING:
        return True
    top = record.name.split(".", 1)[0]
    return top not in CHATTY


def fail(job: str, message: Any) -> None:
    """One line on stderr, exit status 2."""
    print(f"{job}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def setup(schema: Type[T], job: str, argv: Optional[Sequence[str]] = None,
          check: Optional[Callable[[T], Any]] = None) -> T:
    """Resolve and check the config (exit 2 with the problem on a bad one),
    then create ``output``, write ``output/config.yaml`` and start the logs.
    An ``output`` at a URI (``s3://...``) gets its config there; its log file
    is kept in a local staging folder and copied there when the job ends."""
    from aesformer import storage

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(schema, job, argv)
        if cfg.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got '{cfg.log_level}'")
        if storage.is_uri(cfg.output) and job not in URI_OUTPUTS:
            raise ConfigError(f"output='{cfg.output}': {job} writes its output to a local or shared folder only "
                              f"(a URI works for {', '.join(URI_OUTPUTS)})")
        if check is not None:
            check(cfg)
    except ConfigError as e:
        fail(job, e)

    storage.makedirs(cfg.output)
    cfg.output = storage.resolve(cfg.output)
    text = to_yaml(cfg)
    storage.write_text(storage.join(cfg.output, "config.yaml"), text)
    setup_logging(cfg.log_level, storage.staging(cfg.output) / "logs" / f"{job}.log")
    logger = logging.getLogger(job)
    logger.debug("resolved config:\n%s", text)
    _to_file_only(logger, f"resolved config ({storage.join(cfg.output, 'config.yaml')}):\n{text}")
    return cfg


def _to_file_only(logger: logging.Logger, message: str) -> None:
    """A record the log file gets and the console does not."""
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, None, None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler) and getattr(h, "_aesformer", False):
            h.handle(record)


def run_job(schema: Type[T], job: str, run: Callable[[T], Any], argv: Optional[Sequence[str]] = None,
            check: Optional[Callable[[T], Any]] = None) -> Any:
    """The entry point of every job: :func:`setup`, then ``run(cfg)``. A
    ConfigError raised while running (a problem found in the data, say)
    also ends as one line and exit status 2."""
    cfg = setup(schema, job, argv, check)
    try:
        return run(cfg)
    except ConfigError as e:
        fail(job, e)
    finally:
        _keep_logs(cfg.output, job)


def _keep_logs(output: str, job: str) -> None:
    """The job's log beside its outputs: for a local output it is there
    already (with a link to the local Ray session's logs); for a URI it is
    copied there."""
    from aesformer import storage

    if not storage.is_uri(output):
        _link_ray_logs(Path(output) / "logs")
        return
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler) and getattr(h, "_aesformer", False):
            h.flush()
    log_file = storage.staging(output) / "logs" / f"{job}.log"
    try:
        storage.write_bytes(storage.join(output, "logs", f"{job}.log"), log_file.read_bytes())
    except OSError as e:
        logging.getLogger(job).warning("could not copy the log to %s: %s (it stays in %s)", output, e, log_file)


def _link_ray_logs(logs: Path) -> None:
    """``<output>/logs/ray``: the workers' logs of a local Ray session."""
    from aesformer.cluster import session_logs

    if "ray" not in sys.modules:
        return
    folder = session_logs()
    link = logs / "ray"
    if folder is None or link.exists() or link.is_symlink():
        return
    try:
        logs.mkdir(parents=True, exist_ok=True)
        link.symlink_to(folder, target_is_directory=True)
    except OSError:
        pass

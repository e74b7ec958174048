"""MLflow tracking through one small helper.

The embedded default is a SQLite store with an artifact folder under
``<output>/mlflow``; any tracking URI can be set with ``tracking.uri=``.
With an ``output`` at a URI (``s3://...``) the embedded store's SQLite file
stays in the output's local staging folder on the driver's machine and the
artifacts go to ``<output>/mlflow/artifacts``. On a cluster of several nodes
the store must be a tracking server (:func:`check_tracking_across_nodes`).
A training worker attaches to the driver's run with ``Tracker.attach``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from aesformer.config import flatten, to_dict, to_yaml

log = logging.getLogger(__name__)

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def default_uri(output: str | os.PathLike) -> str:
    from aesformer.storage import staging

    return f"sqlite:///{staging(output).resolve() / 'mlflow' / 'mlflow.db'}"


def default_artifacts(output: str | os.PathLike) -> str:
    """Where the embedded store keeps artifacts: a folder URI under ``output``."""
    from aesformer import storage

    if storage.is_uri(output):
        return storage.join(output, "mlflow", "artifacts")
    return (Path(output).resolve() / "mlflow" / "artifacts").as_uri()


def check_tracking_across_nodes(cfg: Any, nodes: int) -> None:
    """On a cluster of several nodes, refuse a tracking store that is a file
    on the driver's disk (SQLite or a file: folder): other nodes cannot open
    it, and a SQLite file must never be written from several machines."""
    from aesformer.config import ConfigError

    tc = cfg.tracking
    if not tc.enabled or nodes < 2:
        return
    uri = tc.uri or default_uri(cfg.output)
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        raise ConfigError(
            f"tracking.uri='{uri}' is a store on this node's disk, and this cluster has {nodes} nodes: workers "
            f"elsewhere cannot open it. Start an MLflow tracking server (for example `mlflow server "
            f"--backend-store-uri sqlite:///mlflow.db --artifacts-destination s3://bucket/mlflow --host <head>`) "
            f"and set tracking.uri=http://<head>:<port>, or set tracking.enabled=false")


class Tracker:
    """One MLflow run; every call is a no-op when tracking is disabled."""

    def __init__(self, uri: Optional[str], run_id: Optional[str], enabled: bool = True):
        self.uri = uri
        self.run_id = run_id
        self.enabled = enabled and run_id is not None
        self.timings: dict[str, float] = {}
        self._client = None
        if self.enabled:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=uri)

    @classmethod
    def start(cls, cfg: Any, job: str) -> "Tracker":
        """Create the run for a job, log its resolved config as params and YAML."""
        tc = cfg.tracking
        if not tc.enabled:
            return cls(None, None, enabled=False)
        from mlflow.tracking import MlflowClient

        from aesformer.storage import staging

        uri = tc.uri or default_uri(cfg.output)
        if uri.startswith("sqlite:///"):
            (staging(cfg.output) / "mlflow").mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(tc.experiment)
        if exp is None:
            artifacts = default_artifacts(cfg.output) if uri.startswith("sqlite:///") else None
            exp_id = client.create_experiment(tc.experiment, artifact_location=artifacts)
        else:
            exp_id = exp.experiment_id
        run = client.create_run(exp_id, run_name=tc.run_name or f"{job}-{time.strftime('%Y%m%d-%H%M%S')}",
                                tags={"aesformer.job": job, "aesformer.profile": cfg.profile})
        tracker = cls(uri, run.info.run_id)
        params = {k: ("" if v is None else str(v))[:500] for k, v in flatten(to_dict(cfg)).items()}
        tracker.log_params(params)
        tracker.log_text(to_yaml(cfg), "config.yaml")
        return tracker

    @classmethod
    def attach(cls, uri: Optional[str], run_id: Optional[str]) -> "Tracker":
        """Log into an existing run from another process (e.g. a train worker)."""
        return cls(uri, run_id, enabled=run_id is not None)

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self._client.log_batch(self.run_id, metrics=items)

    @contextlib.contextmanager
    def phase(self, name: str, step: Optional[int] = None) -> Iterator[None]:
        """Time a phase; logs ``time/<name>`` seconds and keeps the total."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.timings[name] = self.timings.get(name, 0.0) + dt
            self.log_metrics({f"time/{name}": dt}, step=step)

    def log_artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        """A local file or folder, or one at a URI (copied here first)."""
        if not self.enabled:
            return
        from aesformer import storage

        if storage.is_uri(path):
            import tempfile

            with tempfile.TemporaryDirectory(prefix="aesformer-artifact-") as tmp:
                self.log_artifact(storage.download(path, Path(tmp) / storage.name(path)), artifact_path)
            return
        p = Path(path)
        if p.is_dir():
            self._client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(p), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        if self.enabled:
            self._client.log_text(self.run_id, text, name)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(exc)
        return False

    def close(self, error: Optional[BaseException] = None) -> None:
        """End the run: FINISHED, or FAILED with the error recorded (KILLED
        on Ctrl-C). A second call does nothing."""
        if not self.enabled:
            return
        if error is None:
            self.finish()
            return
        message = f"{type(error).__name__}: {error}"
        try:
            self.log_text(message + "\n", "error.txt")
            self._client.set_tag(self.run_id, "aesformer.error", message[:5000])
        finally:
            self.finish("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")

    def finish(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        self.log_params({f"total_time/{k}": f"{v:.3f}" for k, v in self.timings.items()})
        self._client.set_terminated(self.run_id, status=status)
        self.enabled = False

"""Tracking: the embedded MLflow store under output, read back with MLflow's client."""
from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from aesformer.config import JobConfig, TrackingConfig
from aesformer.tracking import Tracker, default_uri


@dataclass
class RunConfig(JobConfig):
    lr: float = 0.5


def test_a_logged_run_reads_back_with_the_mlflow_client(tmp_path):
    cfg = RunConfig(output=str(tmp_path))
    tracker = Tracker.start(cfg, "demo")
    for step, loss in enumerate([3.0, 2.0, 1.5]):
        tracker.log_metrics({"loss": loss}, step=step)
    with tracker.phase("rollout", step=0):
        pass
    (tmp_path / "note.txt").write_text("hello")
    tracker.log_artifact(tmp_path / "note.txt")
    tracker.finish()

    assert (tmp_path / "mlflow" / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=default_uri(tmp_path))
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.5"
    assert run.data.params["ray.worker_threads"] == "1"
    assert run.data.tags["aesformer.job"] == "demo"
    history = client.get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 3.0), (1, 2.0), (2, 1.5)]
    assert client.get_metric_history(tracker.run_id, "time/rollout")[0].value >= 0.0
    names = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"config.yaml", "note.txt"} <= names


def test_a_worker_attaches_to_the_drivers_run(tmp_path):
    tracker = Tracker.start(RunConfig(output=str(tmp_path)), "demo")
    worker = Tracker.attach(tracker.uri, tracker.run_id)
    worker.log_metrics({"tokens_per_s": 123.0}, step=7)
    hist = MlflowClient(tracking_uri=tracker.uri).get_metric_history(tracker.run_id, "tokens_per_s")
    assert [(m.step, m.value) for m in hist] == [(7, 123.0)]


def test_disabled_tracking_writes_nothing(tmp_path):
    cfg = RunConfig(output=str(tmp_path), tracking=TrackingConfig(enabled=False))
    tracker = Tracker.start(cfg, "demo")
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.finish()
    assert not (tmp_path / "mlflow").exists()

"""The evaluate job on the tiny profile: the four built-in systems through
Ray Data, the tiny VLM judging in both orders, the scorers (LAION on a tiny
CLIP stand-in, Q-Align on the tiny VLM, ArtiMuse absent and skipped), the
whole report, MLflow, and a rerun that generates and asks nothing."""

import pytest

from eval_pairs import write_eval_pairs, write_tiny_laion

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# base_thinker_editor runs the same code path as aesformer (a thinker, then the editor);
# it is left out here to keep the test short
SYSTEMS = ["aesformer", "editor_only", "identity"]


def _args(data, out, laion):
    scorers = (f"[{{name: laion, kind: laion, clip: '{laion['clip']}', clip_weights: '{laion['clip_weights']}', "
               f"weights: '{laion['weights']}'}}, {{name: qalign, kind: qalign, model: 'tiny:judge', max_pixels: 4096}}, "
               "{name: artimuse, kind: artimuse}, {name: classical, kind: 'classical:aesthetic'}]")
    return [f"data={data}", f"output={out}", "limit=2", f"systems=[{','.join(SYSTEMS)}]", "catalog.aesformer.lora=none", "thinker.max_tokens=16",
            "editor.steps=2", "editor.output_area=2304", "judge.both_orders=1.0", "judge.max_pixels=4096",
            "n_boot=500", "ray.num_cpus=4", f"scorers={scorers}"]


def _start_ray(attempts: int = 3):
    """The job's local Ray, started here once for both runs; on a crowded machine
    its node may miss Ray's 30 s start-up window, so it gets a few tries."""
    from aesformer.cluster import init_ray
    from aesformer.config import RayConfig

    for i in range(attempts):
        try:
            return init_ray(RayConfig(num_cpus=4, num_gpus=0))
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception on a start-up timeout
            if i == attempts - 1:
                raise
            import ray

            ray.shutdown()


@pytest.fixture(scope="module")
def evaluated(tiny_models, tmp_path_factory):
    from aesformer.cluster import shutdown_ray
    from aesformer.jobs import evaluate

    tmp = tmp_path_factory.mktemp("evaluate")
    data = write_eval_pairs(tmp / "data", n=3, side=64)
    laion = write_tiny_laion(tmp / "laion")
    _start_ray()
    try:
        first = evaluate.main(_args(data, tmp / "out", laion))
        made = _made(tmp / "out")
        again = evaluate.main(_args(data, tmp / "out", laion))
    finally:
        shutdown_ray()
    assert made == _made(tmp / "out"), "the rerun rewrote an output or a verdict"
    return first, again, tmp / "out"


def _made(out):
    """What the job made: every output file with its modification time, and every stored verdict."""
    from aesformer.evaluation.store import open_store

    files = {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in (out / "outputs").rglob("*") if p.is_file()}
    store = open_store(out)
    try:
        verdicts = sorted((v["key"], v["ord"], v["created"]) for v in store.verdicts())
    finally:
        store.close()
    return files, verdicts


def test_the_whole_report_on_the_tiny_profile(evaluated):
    first, _, out = evaluated
    for name in ("report.md", "report.html", "report.json", "win_rates.png", "scores.png", "cases.png", "pairs.json"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    for label in ("AesFormer", "Editor, no thinker", "Identity (poor photo)"):
        assert f"| {label} | ours |" in md, label
    assert "| AesFormer | paper | AesThinker | 65.33 | 68.63 | 26.25 | 24.39 | 47.76 | 5.60 | 3.51 |" in md
    assert "| Editor, no thinker | ours | None |" in md and "| Qwen-Image-Edit-2511 | paper | None | 16.50 |" in md
    assert "Scorer artimuse: skipped: artimuse: weights is not set" in md
    assert "Scorer laion: ok, scale 1-10" in md and "Scorer qalign: ok, scale 1-5" in md
    assert "Judge: kind=local, model=tiny:judge" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "src=\"http" not in page
    s = first["summary"]["systems"]
    assert list(s) == SYSTEMS
    for name in SYSTEMS:
        assert s[name]["win_vs_poor"]["n"] == 2 and s[name]["win_vs_good"]["n"] == 2
        assert 1.0 <= s[name]["scores"]["qalign"]["mean"] <= 5.0
        assert set(s[name]["scores"]) == {"laion", "qalign", "classical"}
    # 2 photos through 2 model systems, and the identity baseline's 2 copies
    assert first["generated"] == 6
    # 3 systems x 2 photos x (poor, good) x both orders
    assert first["judge_asked"] == first["judge_requests"] == 24 and first["judge_failed"] == 0
    outputs = sorted(p.relative_to(out).as_posix() for p in (out / "outputs").glob("*/seed0/images/*.png"))
    assert len(outputs) == 6 and "outputs/identity/seed0/images/astronaut.png" in outputs
    # the grid: one row per case (2 photos here), columns poor | each system | good, 160-pixel cells
    from PIL import Image

    assert Image.open(out / "cases.png").size == (5 * 164 + 4, 2 * 164 + 4 + 16)


def test_identity_against_the_poor_photo_is_fifty_percent_with_both_orders(evaluated):
    first, _, _ = evaluated
    rate = first["summary"]["systems"]["identity"]["win_vs_poor"]
    assert abs(rate["rate"] - 50.0) <= 2.0, rate


def test_a_rerun_generates_nothing_and_asks_the_judge_nothing(evaluated):
    """Counted by the job, and seen on disk: the fixture checks that no output file
    and no stored verdict changed in the rerun."""
    first, again, _ = evaluated
    assert again["generated"] == 0 and again["judge_asked"] == 0 and again["judge_requests"] == 0
    assert again["scored"] == 0
    assert again["summary"]["systems"] == first["summary"]["systems"]


def test_everything_is_in_mlflow(evaluated):
    from mlflow.tracking import MlflowClient

    _, _, out = evaluated
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("aesformer").experiment_id])
    assert len(runs) == 2
    first = min(runs, key=lambda r: r.info.start_time)
    assert first.data.metrics["identity.win_vs_poor"] == pytest.approx(50.0, abs=2.0)
    assert first.data.metrics["judge_requests"] == 24 and first.data.params["judge_used.kind"] == "local"
    names = {a.path for a in client.list_artifacts(first.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/report.json", "report/win_rates.png",
            "report/scores.png", "report/cases.png", "report/pairs.json"} <= names
    assert first.data.metrics["aesformer.qalign"] > 0 and "identity.win_vs_good" in first.data.metrics

"""Evaluate systems on AesRecon: judged win rates, aesthetic scores, the report.

1. Each system under test (a thinker and an editor, see
   :mod:`aesformer.evaluation.systems`) reconstructs the test photos by Ray
   Data batch inference; outputs are cached by (system, photo, seed), so a
   rerun generates nothing twice and a killed run resumes.
2. A pairwise judge compares each output with the poor and with the good
   photo (A/B order at random per comparison, both orders on a share of
   them); every verdict is stored with the raw reply, and a rerun asks the
   judge nothing twice.
3. Aesthetic scorers (:mod:`aesformer.scorers`) score every output and both
   reference photos; a scorer whose weights are absent is skipped and the
   report says why.
4. The report: ``report.md``, ``report.html`` (self-contained), ``report.json``,
   ``win_rates.png``, ``scores.png``, ``cases.png``; human votes from
   ``jobs/rate.py`` are added when there are any. Everything goes to MLflow.

    python jobs/evaluate.py data=runs/vcmp/pairs output=runs/evaluate limit=100
    python jobs/evaluate.py data=... systems=[aesformer,identity] lora=runs/editor_lora/lora
    python jobs/evaluate.py data=... catalog_file=evaluate_ablation.yaml sft_thinker=... trained_thinker=...
"""
from __future__ import annotations

if __package__ in (None, ""):
    import _prelude  # noqa: F401  (makes aesformer importable when run as a script)

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from aesformer.cluster import init_ray
from aesformer.config import ConfigError, JobConfig, conf_dir
from aesformer.job import run_job
from aesformer.progress import DETAIL, Progress
from aesformer.jobs.reconstruct import EditorSettings, ThinkerSettings
from aesformer.tracking import Tracker

log = logging.getLogger("evaluate")


@dataclass
class EndpointSettings:
    """An OpenAI-compatible endpoint (the distillation teacher's client)."""
    base_url: Optional[str] = None
    model: Optional[str] = None
    api_key_env: Optional[str] = "OPENAI_API_KEY"
    timeout_s: float = 120.0
    max_retries: int = 4
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    requests_per_minute: float = 0.0
    concurrency: int = 4
    image_max_side: int = 1024


@dataclass
class JudgeSettings:
    kind: str = "local"              # local (a VLM pool, first-token reading) | openai
    model: Optional[str] = None      # local: the VLM (default models.judge)
    endpoint: EndpointSettings = field(default_factory=EndpointSettings)
    temperature: float = 0.0
    max_tokens: int = 128
    both_orders: float = 0.25        # share of comparisons asked in both A/B orders
    retry_failed: bool = False       # ask again where an earlier run recorded a failure
    # local pool
    engine: str = "hf"
    pool: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    batch_size: int = 4
    dtype: str = "bfloat16"
    max_pixels: Optional[int] = 401_408


@dataclass
class EvaluateConfig(JobConfig):
    output: str = "runs/evaluate"
    data: Optional[str] = None       # an AesRecon folder
    split: Optional[str] = "test"    # None: every row
    limit: Optional[int] = None      # at most this many photos
    seeds: list = field(default_factory=lambda: [0])
    systems: Optional[list] = None   # names to evaluate (None: every system of the catalog)
    catalog: dict = field(default_factory=dict)        # systems added to (or replacing) the built-ins
    catalog_file: Optional[str] = None                 # a YAML (in conf/ or a path) whose systems replace the built-ins
    # the models a system names symbolically
    trained_thinker: Optional[str] = None   # "trained" (default models.thinker)
    base_thinker: Optional[str] = None      # "base" (default models.thinker)
    sft_thinker: Optional[str] = None       # "sft"
    lora: Optional[str] = None              # "trained" editor LoRA
    thinker: ThinkerSettings = field(default_factory=ThinkerSettings)
    thinker_endpoint: EndpointSettings = field(default_factory=EndpointSettings)
    editor: EditorSettings = field(default_factory=EditorSettings)
    judge: JudgeSettings = field(default_factory=JudgeSettings)
    # list of aesformer.scorers.ScorerSpec fields
    scorers: list = field(default_factory=lambda: [
        {"name": "laion", "kind": "laion"}, {"name": "qalign", "kind": "qalign"},
        {"name": "artimuse", "kind": "artimuse"}, {"name": "classical", "kind": "classical:aesthetic"}])
    scorer_columns: dict = field(default_factory=lambda: {"laion": "laion", "qalign": "qalign",
                                                          "artimuse": "artimuse"})
    grid_cases: int = 4
    n_boot: int = 2000


# -- inputs ------------------------------------------------------------------------------

def load_photos(cfg: EvaluateConfig, out: Path) -> list[dict]:
    """The evaluated pairs as reference files ``references/<photo>/{poor,good}.png`` (written once)."""
    from aesformer.data import finished_shards, iter_pairs
    from aesformer.evaluation.systems import safe_name

    if not cfg.data:
        raise ConfigError("data= is required: an AesRecon folder")
    if not finished_shards(cfg.data):
        raise ConfigError(f"data '{cfg.data}' holds no finished AesRecon shards")
    photos = []
    for row in iter_pairs(cfg.data, ["id", "poor_image", "good_image"], split=cfg.split):
        name = safe_name(row["id"])
        folder = out / "references" / name
        for which in ("poor", "good"):
            path = folder / f"{which}.png"
            if not path.exists():
                from aesformer.data import decode_image

                folder.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp")
                decode_image(row[f"{which}_image"], row=row["id"], field=f"{which}_image").save(tmp, format="PNG")
                tmp.replace(path)
        photos.append({"name": name, "poor": str(folder / "poor.png"), "good": str(folder / "good.png")})
        if cfg.limit and len(photos) >= cfg.limit:
            break
    if not photos:
        raise ConfigError(f"data '{cfg.data}' has no rows" + (f" in split '{cfg.split}'" if cfg.split else ""))
    return photos


def system_catalog(cfg: EvaluateConfig):
    from aesformer.evaluation.systems import BUILTIN_SYSTEMS, parse_systems

    catalog = dict(BUILTIN_SYSTEMS)
    if cfg.catalog_file:
        path = Path(cfg.catalog_file).expanduser()
        path = path if path.exists() else conf_dir() / cfg.catalog_file
        if not path.exists():
            raise ConfigError(f"catalog_file '{cfg.catalog_file}' is neither a file nor in {conf_dir()}")
        import yaml

        catalog = dict((yaml.safe_load(path.read_text()) or {}).get("systems") or {})
    for name, override in (cfg.catalog or {}).items():  # a field set here replaces the same field only
        catalog[name] = {**(catalog.get(name) or {}), **(override or {})}
    return parse_systems(catalog, cfg.systems)


def resolve_system(cfg: EvaluateConfig, spec) -> dict:
    """The concrete models of a system: {thinker, editor, lora} (paths, or None)."""
    from aesformer.models import resolve_model

    named = {"trained": cfg.trained_thinker or cfg.models.thinker, "base": cfg.base_thinker or cfg.models.thinker,
             "sft": cfg.sft_thinker}
    if spec.editor == "identity":
        return {"thinker": None, "editor": None, "lora": None}
    thinker = spec.thinker
    if thinker in named:
        if not named[thinker]:
            raise ConfigError(f"system '{spec.name}' uses the {thinker} thinker: set {thinker}_thinker=")
        thinker = resolve_model(named[thinker], cfg.models.cache_dir, f"{spec.thinker}_thinker")
    elif thinker not in ("none", "endpoint"):
        thinker = resolve_model(thinker, cfg.models.cache_dir, f"systems.{spec.name}.thinker")
    lora = {"trained": cfg.lora, "none": None}.get(spec.lora, spec.lora)
    if spec.lora == "trained" and not cfg.lora:
        raise ConfigError(f"system '{spec.name}' uses the trained editor LoRA: set lora=")
    if lora and not Path(lora).expanduser().exists():
        raise ConfigError(f"system '{spec.name}': LoRA '{lora}' does not exist")
    editor = resolve_model(cfg.models.editor, cfg.models.cache_dir, "models.editor")
    return {"thinker": thinker, "editor": editor, "lora": str(Path(lora).expanduser().resolve()) if lora else None}


# -- 1. generation -------------------------------------------------------------------------

def identity_outputs(folder: Path, photos: list[dict]) -> int:
    """The identity baseline: the output is the poor photo (copied, record written last)."""
    import shutil

    from PIL import Image

    for sub in ("images", "results"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for p in photos:
        image = folder / "images" / f"{p['name']}.png"
        shutil.copyfile(p["poor"], image)
        w, h = Image.open(image).size
        rec = {"name": p["name"], "status": "ok", "reason": None, "image": str(image), "plan": "", "width": w,
               "height": h}
        tmp = folder / "results" / f".{p['name']}.json.tmp"
        tmp.write_text(json.dumps(rec))
        tmp.replace(folder / "results" / f"{p['name']}.json")
    return len(photos)


def generate(cfg: EvaluateConfig, spec, models: dict, folder: Path, photos: list[dict], seed: int) -> int:
    """Outputs of one system for the photos not yet done; returns how many were made."""
    import ray
    from ray.data import ActorPoolStrategy

    from aesformer.actors.evaluate import EndpointThinker, shuffled, with_instruction
    from aesformer.actors.reconstruct import EditorPool, ThinkerPool, load_photo
    from aesformer.evaluation.systems import GENERIC_INSTRUCTION
    from aesformer.stages import model_stage, stage_errors

    if spec.editor == "identity":
        return identity_outputs(folder, photos)
    th, ed = cfg.thinker, cfg.editor
    items = [{"name": p["name"], "source": p["poor"], "data": None} for p in photos]
    dataset = ray.data.from_items(items, override_num_blocks=min(len(items), 64))
    dataset = dataset.map(load_photo, fn_kwargs=dict(min_side=8, max_pixels=16_000_000, max_input_pixels=180_000_000))
    sampling = dict(temperature=th.temperature, top_p=th.top_p, max_tokens=th.max_tokens)
    if spec.thinker == "none":
        dataset = dataset.map(with_instruction, fn_kwargs=dict(instruction=spec.instruction or GENERIC_INSTRUCTION))
    elif spec.thinker == "endpoint":
        if not cfg.thinker_endpoint.base_url or not cfg.thinker_endpoint.model:
            raise ConfigError(f"system '{spec.name}' uses a thinker endpoint: set thinker_endpoint.base_url and .model")
        dataset = model_stage(dataset, "thinker", EndpointThinker, cfg.ray, batch_format="pyarrow",
                              batch_size=th.batch_size, compute=ActorPoolStrategy(size=1), num_cpus=0.5,
                              fn_constructor_kwargs=dict(endpoint=asdict(cfg.thinker_endpoint),
                                                         instruction=th.instruction,
                                                         sampling=dict(sampling, seed=seed)))
    else:
        engine_options = dict(dtype=th.dtype if th.num_gpus else "float32", max_pixels=th.max_pixels,
                              batch_size=th.batch_size)
        if th.engine != "hf" and th.num_gpus:
            engine_options = dict(dtype=th.dtype, max_pixels=th.max_pixels, tensor_parallel_size=th.tensor_parallel,
                                  seed=seed)
        dataset = model_stage(
            dataset, "thinker", ThinkerPool, cfg.ray, batch_format="pyarrow", batch_size=th.batch_size,
            compute=ActorPoolStrategy(size=th.pool),
            num_gpus=th.num_gpus * th.tensor_parallel, num_cpus=th.num_cpus,
            fn_constructor_kwargs=dict(model_path=models["thinker"], engine=th.engine, engine_options=engine_options,
                                       sampling=sampling, instruction=th.instruction, seed=seed))
    if spec.shuffle_dimensions:
        dataset = dataset.map(shuffled, fn_kwargs=dict(seed=seed))
    dataset = model_stage(
        dataset, "editor", EditorPool, cfg.ray, batch_format="pyarrow", batch_size=ed.batch_size,
        compute=ActorPoolStrategy(size=ed.pool),
        num_gpus=ed.num_gpus, num_cpus=ed.num_cpus,
        fn_constructor_kwargs=dict(editor_path=models["editor"], out_dir=str(folder), lora=models["lora"],
                                   control_area=ed.control_area, condition_area=ed.condition_area,
                                   output_area=ed.output_area, steps=ed.steps, true_cfg_scale=ed.true_cfg_scale,
                                   negative_prompt=ed.negative_prompt, dtype=ed.dtype if ed.num_gpus else "float32",
                                   device="cuda" if ed.num_gpus else "cpu", seed=seed, height=ed.height,
                                   width=ed.width, editor_name=cfg.models.editor, offload=ed.offload))
    made = 0
    with Progress(f"generate {spec.name}", len(items), "photos") as bar, stage_errors(cfg.ray):
        for rec in dataset.iter_rows():
            made += rec["status"] == "ok"
            log.info("%s seed %d: %s %s", spec.name, seed, rec["name"], rec["status"], extra=DETAIL)
            bar.update(1)
    return made


# -- 2. judge ------------------------------------------------------------------------------

def comparisons(cfg: EvaluateConfig, systems, photos, store) -> list[dict]:
    """The judgements still to ask: every (output, reference, order) without a stored verdict."""
    from aesformer.evaluation.judge import comparison_key, orders_for
    from aesformer.evaluation.systems import finished_outputs, output_dir

    have = store.verdict_keys()
    if cfg.judge.retry_failed:
        have -= {(v["key"], v["ord"]) for v in store.verdicts() if not v["outcome"]}
    by_name = {p["name"]: p for p in photos}
    rows = []
    for spec in systems:
        for seed in cfg.seeds:
            done = finished_outputs(output_dir(cfg.output, spec.name, seed))
            for name, rec in done.items():
                if name not in by_name or rec.get("status") != "ok":
                    continue
                for ref in ("poor", "good"):
                    key = comparison_key(spec.name, name, seed, ref)
                    for order in orders_for(key, job_seed=cfg.seed, both_orders=cfg.judge.both_orders):
                        if (key, order) not in have:
                            rows.append({"key": key, "ord": order, "system": spec.name, "photo": name, "seed": seed,
                                         "reference": ref, "output": rec["image"],
                                         "reference_path": by_name[name][ref]})
    return rows


def judge_settings(cfg: EvaluateConfig) -> dict:
    j = cfg.judge
    if j.kind == "openai":
        e = j.endpoint
        return {"kind": "openai", "model": e.model, "base_url": e.base_url, "temperature": j.temperature,
                "max_tokens": j.max_tokens, "image_max_side": e.image_max_side, "max_retries": e.max_retries,
                "both_orders": j.both_orders}
    return {"kind": "local", "model": j.model or cfg.models.judge, "engine": j.engine, "reading": "first-token A/B/T",
            "max_pixels": j.max_pixels, "both_orders": j.both_orders}


def ask_judge(cfg: EvaluateConfig, rows: list[dict], store) -> dict:
    """Asks every judgement in ``rows`` and stores each verdict as it comes; returns counts."""
    from aesformer.actors.evaluate import LocalJudge, endpoint_verdicts

    counts = {"asked": 0, "requests": 0, "failed": 0}

    def keep(rec: dict) -> None:
        store.put_verdict(rec)
        counts["asked"] += 1
        counts["requests"] += int(rec["requests"] or 0)
        counts["failed"] += rec["outcome"] is None
        if rec["outcome"] is None:
            log.warning("judge failed on %s (%s): %s", rec["key"], rec["ord"], rec["error"], extra=DETAIL)

    if not rows:
        return counts
    j = cfg.judge
    if j.kind == "openai":
        from aesformer.distill.chat import OpenAIChat

        e = j.endpoint
        if not e.base_url or not e.model:
            raise ConfigError("judge.kind=openai needs judge.endpoint.base_url and judge.endpoint.model")
        chat = OpenAIChat(**asdict(e), role="judge")
        sampling = {"temperature": j.temperature, "max_tokens": j.max_tokens}
        step = max(1, e.concurrency * 2)
        for i in range(0, len(rows), step):
            for rec in endpoint_verdicts(chat, rows[i:i + step], sampling):
                rec["failures"] = json.loads(rec["failures"])
                keep(rec)
        return counts
    if j.kind != "local":
        raise ConfigError(f"judge.kind must be local or openai, got '{j.kind}'")
    import ray
    from ray.data import ActorPoolStrategy

    from aesformer.models import resolve_model
    from aesformer.stages import model_stage, stage_errors

    path = resolve_model(j.model or cfg.models.judge, cfg.models.cache_dir, "judge.model")
    options = dict(dtype=j.dtype if j.num_gpus else "float32", max_pixels=j.max_pixels)
    if j.engine == "hf":
        options["batch_size"] = j.batch_size
    dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), 64))
    dataset = model_stage(dataset, "judge", LocalJudge, cfg.ray, batch_format="pyarrow", batch_size=j.batch_size,
                          compute=ActorPoolStrategy(size=j.pool), num_gpus=j.num_gpus, num_cpus=j.num_cpus,
                          fn_constructor_kwargs=dict(model_path=path, engine=j.engine, engine_options=options))
    with Progress("judge", len(rows), "judgements") as bar, stage_errors(cfg.ray):
        for rec in dataset.iter_rows():
            keep(dict(rec))
            bar.update(1)
    return counts


# -- 3. scores -----------------------------------------------------------------------------

def score_all(cfg: EvaluateConfig, systems, photos, store) -> tuple[dict, int]:
    """Scores every output and reference photo not yet scored; returns
    ({scorer: status}, how many scores were computed)."""
    from PIL import Image

    from aesformer.scorers import ScorerSpec, ScorerUnavailable, load_scorer
    from aesformer.evaluation.systems import finished_outputs, output_dir

    have = store.score_keys()
    status_file = Path(cfg.output) / "scorers.json"  # what each scorer was, kept for reruns that compute nothing
    earlier = json.loads(status_file.read_text()) if status_file.exists() else {}
    status, computed = {}, 0
    items = []
    for p in photos:
        items += [("@poor", p["name"], 0, p["poor"]), ("@good", p["name"], 0, p["good"])]
    for spec in systems:
        for seed in cfg.seeds:
            for name, rec in finished_outputs(output_dir(cfg.output, spec.name, seed)).items():
                if rec.get("status") == "ok":
                    items.append((spec.name, name, seed, rec["image"]))
    for raw in cfg.scorers:
        try:
            sspec = ScorerSpec(**raw)
        except TypeError as e:
            raise ConfigError(f"scorers: {e}") from None
        name = sspec.name or sspec.kind
        todo = [it for it in items if (name, it[0], it[1], it[2]) not in have]
        if not todo:
            status[name] = earlier.get(name, "ok (all scores cached)")
            continue
        try:
            scorer = load_scorer(sspec, cache_dir=cfg.models.cache_dir)
        except ScorerUnavailable as e:
            status[name] = f"skipped: {e}"
            log.warning("scorer %s skipped: %s", name, e)
            continue
        for i in range(0, len(todo), max(1, sspec.batch_size)):
            part = todo[i:i + sspec.batch_size]
            values = scorer([Image.open(it[3]).convert("RGB") for it in part])
            store.put_scores({"scorer": name, "system": it[0], "photo": it[1], "seed": it[2], "value": float(v)}
                             for it, v in zip(part, values))
            computed += len(part)
        status[name] = f"ok, scale {scorer.scale[0]:g}-{scorer.scale[1]:g} ({scorer.settings.get('kind')})"
    status_file.write_text(json.dumps({**earlier, **status}, indent=1))
    return status, computed


# -- 4. report -----------------------------------------------------------------------------

def write_pairs(cfg: EvaluateConfig, systems, photos) -> Path:
    """``pairs.json``: every (output, reference) comparison, for the rating page."""
    from aesformer.evaluation.judge import comparison_key
    from aesformer.evaluation.systems import finished_outputs, output_dir

    by_name = {p["name"]: p for p in photos}
    pairs = []
    for spec in systems:
        for seed in cfg.seeds:
            for name, rec in sorted(finished_outputs(output_dir(cfg.output, spec.name, seed)).items()):
                if name in by_name and rec.get("status") == "ok":
                    for ref in ("poor", "good"):
                        pairs.append({"pair": comparison_key(spec.name, name, seed, ref), "output": rec["image"],
                                      "reference": by_name[name][ref]})
    path = Path(cfg.output) / "pairs.json"
    path.write_text(json.dumps(pairs, indent=1))
    return path


def write_report(cfg: EvaluateConfig, systems, photos, store, meta: dict) -> dict:
    from PIL import Image

    from aesformer.evaluation import report
    from aesformer.evaluation.systems import finished_outputs, output_dir

    out = Path(cfg.output)
    summary = report.summarise(systems, store.verdicts(), store.scores(), store.votes(), n_boot=cfg.n_boot,
                               seed=cfg.seed)
    labels = {s.name: s.label for s in systems} | {"@poor": "poor photo", "@good": "good photo"}
    plots = [("Win rates", report.plot_win_rates(summary, out / "win_rates.png")),
             ("Score distributions", report.plot_scores(store.scores(), labels, out / "scores.png"))]
    seed = cfg.seeds[0]
    cases = []
    for p in photos[: cfg.grid_cases]:
        images = {"poor": Image.open(p["poor"]), "good": Image.open(p["good"])}
        for s in systems:
            rec = finished_outputs(output_dir(out, s.name, seed)).get(p["name"])
            if rec and rec.get("status") == "ok":
                images[s.label] = Image.open(rec["image"])
        cases.append({"photo": p["name"], "images": images})
    columns = ["poor"] + [s.label for s in systems] + ["good"]
    plots.append(("Cases: poor | each system | good", report.case_grid(cases, columns, out / "cases.png")))
    meta = dict(meta, scorer_columns=cfg.scorer_columns)
    (out / "report.md").write_text(report.markdown(summary, meta))
    (out / "report.html").write_text(report.html(summary, meta, [(t, p) for t, p in plots if p]))
    (out / "report.json").write_text(json.dumps({"summary": summary, "meta": meta}, indent=1, default=str))
    return summary


def run(cfg: EvaluateConfig) -> dict:
    from aesformer.evaluation.store import open_store

    out = Path(cfg.output)
    systems = system_catalog(cfg)
    photos = load_photos(cfg, out)
    with Tracker.start(cfg, "evaluate") as tracker:
        store = open_store(out)
        try:
            result = _evaluate(cfg, systems, photos, store, tracker)
        finally:
            store.close()
    log.info("report: %s (generated %d, judge requests %d)", result["report"], result["generated"],
             result["judge_requests"])
    return result


def _evaluate(cfg: EvaluateConfig, systems, photos, store, tracker) -> dict:
    from aesformer.evaluation.systems import check_spec, finished_outputs, output_dir

    out = Path(cfg.output)
    log.info("%d photos, %d systems (%s), seeds %s", len(photos), len(systems), ", ".join(s.name for s in systems),
             cfg.seeds)
    t0 = time.perf_counter()
    generated, ray_started = 0, False
    with tracker.phase("generate"):
        for spec in systems:
            models = resolve_system(cfg, spec)
            check_spec(out, spec, models)
            for seed in cfg.seeds:
                folder = output_dir(out, spec.name, seed)
                done = finished_outputs(folder)
                todo = [p for p in photos if p["name"] not in done]
                if not todo:
                    continue
                if spec.editor != "identity" and not ray_started:
                    init_ray(cfg.ray)
                    ray_started = True
                n = generate(cfg, spec, models, folder, todo, seed)
                generated += n
                log.info("%s seed %d: %d outputs made, %d cached", spec.name, seed, n, len(photos) - len(todo))
    rows = comparisons(cfg, systems, photos, store)
    with tracker.phase("judge"):
        if rows and cfg.judge.kind == "local" and not ray_started:
            init_ray(cfg.ray)
            ray_started = True
        judged = ask_judge(cfg, rows, store)
    log.info("judge: %d judgements asked (%d requests, %d failed)", judged["asked"], judged["requests"],
             judged["failed"])
    with tracker.phase("score"):
        scorer_status, scored = score_all(cfg, systems, photos, store)
    pairs = write_pairs(cfg, systems, photos)
    meta = {"judge": judge_settings(cfg), "scorers": scorer_status, "photos": len(photos), "seeds": cfg.seeds,
            "data": cfg.data, "split": cfg.split}
    summary = write_report(cfg, systems, photos, store, meta)
    result = {"output": str(out), "report": str(out / "report.md"), "html": str(out / "report.html"),
              "pairs": str(pairs), "photos": len(photos), "generated": generated, "judge_asked": judged["asked"],
              "judge_requests": judged["requests"], "judge_failed": judged["failed"], "scored": scored,
              "votes": summary["votes"], "scorers": scorer_status, "seconds": time.perf_counter() - t0,
              "summary": summary}
    metrics = {k: result[k] for k in ("generated", "judge_asked", "judge_requests", "judge_failed", "scored", "votes")}
    for name, s in summary["systems"].items():
        for ref in ("poor", "good"):
            for kind in ("win", "human"):
                r = s.get(f"{kind}_vs_{ref}")
                if r and r.get("rate") is not None:
                    metrics[f"{name}.{kind}_vs_{ref}"] = r["rate"]
        for sc, v in s["scores"].items():
            metrics[f"{name}.{sc}"] = v["mean"]
    tracker.log_metrics(metrics)
    tracker.log_params({"judge_used." + k: str(v) for k, v in meta["judge"].items()})
    for name in ("report.md", "report.html", "report.json", "win_rates.png", "scores.png", "cases.png", "pairs.json"):
        if (out / name).exists():
            tracker.log_artifact(out / name, "report")
    return result


def check_inputs(cfg: EvaluateConfig) -> None:
    """Before anything starts: the data exists and every system is well defined."""
    from aesformer.data import finished_shards

    if not cfg.data:
        raise ConfigError("data= is required: an AesRecon folder")
    if not Path(cfg.data).expanduser().exists():
        raise ConfigError(f"data='{cfg.data}' does not exist: pass an AesRecon folder")
    if not finished_shards(Path(cfg.data).expanduser()):
        raise ConfigError(f"data='{cfg.data}' holds no finished AesRecon shards")
    if cfg.judge.kind not in ("local", "openai"):
        raise ConfigError(f"judge.kind must be local or openai, got '{cfg.judge.kind}'")
    if cfg.judge.kind == "openai" and not (cfg.judge.endpoint.base_url and cfg.judge.endpoint.model):
        raise ConfigError("judge.kind=openai needs judge.endpoint.base_url and judge.endpoint.model")
    if not cfg.seeds:
        raise ConfigError("seeds= must name at least one seed")
    system_catalog(cfg)


def main(argv=None) -> dict:
    return run_job(EvaluateConfig, "evaluate", run, argv, check=check_inputs)


if __name__ == "__main__":
    main()

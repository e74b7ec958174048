"""Ray Data callables of VCMP.

Model-heavy stages are callable classes run as actor pools (``compute=
ActorPoolStrategy(size=...)``, ``num_gpus`` from the config): each loads its
models once in ``__init__`` and then scores whole batches of rows. The CPU
stages are plain functions run as tasks. Every callable takes and returns
a pyarrow table of :data:`aesformer.vcmp.rows.ROW_SCHEMA`.

Decisions read the config thresholds; every score is recorded whatever the
decision, so a run with permissive thresholds (the tiny profile) still
shows what each model said.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np

from aesformer.vcmp import rows as R

log = logging.getLogger(__name__)


# -- failures never stop the job ------------------------------------------------------------

def guarded(stage: str, rows: list[dict], fn) -> list[dict]:
    """``fn(rows)``; if it raises, each row alone, and a row that still fails
    passes on with ``info["error"]`` set and its pairs dropped (reason kept),
    so one bad video never fails the dataset."""
    try:
        return fn(rows)
    except Exception:
        if len(rows) == 1:
            return [_failed(stage, rows[0])]
    out = []
    for row in rows:
        try:
            out.extend(fn([row]))
        except Exception:
            out.append(_failed(stage, row))
    return out


def _failed(stage: str, row: dict) -> dict:
    import traceback

    err = traceback.format_exc(limit=3)
    log.warning("%s failed on %s segment %s: %s", stage, row.get("video_id"), row.get("segment_index"), err)
    data = R.info(row)
    reason = f"error in {stage}: {err.strip().splitlines()[-1][:300]}"
    data["error"] = {"stage": stage, "reason": reason}
    for p in data.get("pairs", []):
        if p.get("dropped") is None:
            _decide(p, stage, False, reason)
    return R.with_info(row, data)


# -- engines ------------------------------------------------------------------------

def _device(num_gpus: float) -> str:
    import torch

    return "cuda" if num_gpus and torch.cuda.is_available() else "cpu"


def load_judge(path: str, engine: str, max_pixels: Optional[int], batch_size: int, num_gpus: float,
               tensor_parallel: int = 1):
    """(engine, digit token ids) for the judge VLM."""
    from aesformer.engines import make_engine, resolve_engine_kind
    from aesformer.models import score_token_ids

    kind = resolve_engine_kind(engine)
    opts: dict = {"max_pixels": max_pixels}
    if kind == "hf":
        opts.update(device=_device(num_gpus), batch_size=batch_size)
    else:
        opts.update(tensor_parallel_size=tensor_parallel)
    eng = make_engine(kind, path, **opts)
    return eng, score_token_ids(eng.tokenizer())


def _image(row: dict, index: Optional[int]):
    return None if index is None else R.decode(row["images"][index])


def _pairs_alive(data: dict) -> list[dict]:
    return [p for p in data.get("pairs", []) if p.get("dropped") is None]


def _decide(pair: dict, stage: str, ok: bool, reason: str) -> None:
    pair.setdefault("decisions", []).append({"stage": stage, "decision": "keep" if ok else "drop", "reason": reason})
    if not ok and pair.get("dropped") is None:
        pair["dropped"] = stage
        pair["reason"] = reason


# -- stage 2: screening ---------------------------------------------------------------

class ScreenVideos:
    """Manifest rules, then the judge's P(tutorial) on a few frames."""

    def __init__(self, judge: str, engine: str, screen: Any, max_pixels: Optional[int] = None,
                 batch_size: int = 8, num_gpus: float = 0.0, tensor_parallel: int = 1):
        self.cfg = screen
        self.engine, self.digits = load_judge(judge, engine, max_pixels, batch_size, num_gpus, tensor_parallel)

    def __call__(self, batch):
        return R.table(guarded("screen", R.rows_of(batch), self._run))

    def _run(self, rows: list[dict]) -> list[dict]:
        from aesformer.vcmp.decode import iter_frames
        from aesformer.vcmp.screen import manifest_rules, screening_times
        from PIL import Image

        asks, datas = [], []
        for k, row in enumerate(rows):
            data = R.info(row)
            rule = manifest_rules(row["title"], row["source"], self.cfg.blocked_words, self.cfg.allowed_sources)
            data["screen"] = {"rule": rule, "vlm": None, "keep": rule is None,
                              "reason": rule or "tutorial"}
            if rule is None:
                frames = []
                for t in screening_times(data["probe"]["duration"], self.cfg.frames):
                    for _, arr in iter_frames(row["path"], t, None):
                        frames.append(Image.fromarray(arr))
                        break
                if frames:
                    asks.append((k, frames))
            datas.append(data)
        if asks:
            from aesformer.vcmp.judge import judge_probabilities

            probs = judge_probabilities(self.engine, "tutorial", [f for _, f in asks], self.digits)
            for (k, _), p in zip(asks, probs):
                s = datas[k]["screen"]
                s["vlm"] = round(float(p), 4)
                if p < self.cfg.vlm_threshold:
                    s["keep"], s["reason"] = False, f"vlm: P(tutorial) {p:.2f} < {self.cfg.vlm_threshold}"
        return [R.with_info(r, d) for r, d in zip(rows, datas)]


# -- stages 3, 4, 5a: CPU tasks -----------------------------------------------------------

def cpu_task_args(num_cpus: float = 1.0) -> dict:
    """Remote args of the CPU stages, given as a function on purpose: Ray Data
    never fuses an operator that has one into its neighbours, so decoding stays
    in parallel tasks instead of running inside a (small) model actor pool."""
    return {"num_cpus": num_cpus}


def decode_batch(batch, seg: Any, sample: Any, pre: Any, improvement: Any = None, niceness: Optional[int] = 19):
    """Stages 3 to 5a for each video row: its segments, then each segment's
    sampled frames and cheap checks. One task does both, so the decoding is
    one process per task slot rather than two, and segment rows never pass
    through the object store. The task runs at ``niceness`` (Ray starts its
    workers at 15; 19 is the lowest priority): under contention the model
    stages downstream keep pace with decoding, instead of a backlog that
    one actor works through alone at the end."""
    from aesformer.vcmp.flow import sample_stage, segment_stage

    _lower_priority(niceness)
    out = []
    for row in R.rows_of(batch):
        segments = guarded("segment", [row], lambda rows: [o for r in rows for o in segment_stage(r, seg)])
        out.extend(guarded("sample", segments, lambda rows: [sample_stage(r, sample, pre, improvement) for r in rows]))
    return R.table(out)


def _lower_priority(niceness: Optional[int]) -> None:
    """This worker process at ``niceness`` at least (never raised back)."""
    import os

    if niceness is None:
        return
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) < niceness:
            os.setpriority(os.PRIO_PROCESS, 0, min(19, int(niceness)))
    except OSError:  # a platform without priorities: run as is
        pass


# -- stage 5b + 6: good frames and coarse pairs ----------------------------------------------

class JudgeGoodFrames:
    """The judge's P(clean photo-like result) for every plausible frame;
    then the coarse pairs (first frame × chosen good frames)."""

    def __init__(self, judge: str, engine: str, good: Any, max_pixels: Optional[int] = None,
                 batch_size: int = 16, num_gpus: float = 0.0, tensor_parallel: int = 1, shared: Optional[tuple] = None):
        self.cfg = good
        self.engine, self.digits = shared or load_judge(judge, engine, max_pixels, batch_size, num_gpus, tensor_parallel)

    def __call__(self, batch):
        return R.table(guarded("good_frame", R.rows_of(batch), self._run))

    def _run(self, rows: list[dict]) -> list[dict]:
        from aesformer.vcmp.judge import judge_probabilities
        from aesformer.vcmp.pairs import choose_good_frames, pair_id

        datas = [R.info(r) for r in rows]
        asks = []
        for k, (row, data) in enumerate(zip(rows, datas)):
            for i, f in enumerate(data.get("frames", [])):
                f["vlm"], f["good"] = None, False
                if f["plausible"]:
                    asks.append((k, i, _image(row, f["image"])))
        probs = judge_probabilities(self.engine, "good_frame", [[im] for _, _, im in asks], self.digits)
        for (k, i, _), p in zip(asks, probs):
            f = datas[k]["frames"][i]
            f["vlm"] = round(float(p), 4)
            f["good"] = bool(p >= self.cfg.vlm_threshold)
            if not f["good"]:
                f["reason"] = f"vlm: P(clean result) {p:.2f} < {self.cfg.vlm_threshold}"
        out = []
        for row, data in zip(rows, datas):
            if row["kind"] == "segment" and data.get("frames"):
                frames = data["frames"]
                chosen, skipped = choose_good_frames(frames, self.cfg.max_per_segment, self.cfg.min_gap_s,
                                                     self.cfg.min_after_poor_s)
                data["good_skipped"] = {str(i): why for i, why in skipped.items()}
                data["pairs"] = [{
                    "id": pair_id(row["video_id"], row["segment_index"], frames[i]["t"]),
                    "poor": 0, "good": i, "dropped": None,
                    "scores": {"poor_overlay": frames[0]["overlay"], "good_overlay": frames[i]["overlay"],
                               "good_sharpness": frames[i]["sharpness"], "good_motion": frames[i]["motion"] or 0.0,
                               "good_frame_vlm": frames[i]["vlm"]},
                    "decisions": [{"stage": "good_frame", "decision": "keep",
                                   "reason": f"plausible and P(clean result) {frames[i]['vlm']:.2f}"}],
                } for i in chosen]
            out.append(R.with_info(row, data))
        return out


# -- stage 7: good-image filtering ----------------------------------------------------------

class FilterGoodImages:
    """IQA and aesthetic scorers plus the judge's blur/ghosting check."""

    def __init__(self, judge: str, engine: str, quality: Any, max_pixels: Optional[int] = None,
                 batch_size: int = 16, num_gpus: float = 0.0, tensor_parallel: int = 1, shared: Optional[tuple] = None,
                 cache_dir: Optional[str] = None):
        from aesformer.scorers import ScorerUnavailable
        from aesformer.vcmp.quality import quality_scorer

        self.cfg = quality
        device = _device(num_gpus)
        # the scorers of evaluation (aesformer.scorers); one whose weights are absent is skipped
        self.scorers, self.skipped = {}, {}
        for key in ("iqa", "aesthetic"):
            try:
                self.scorers[key] = quality_scorer(getattr(quality, key), device, cache_dir, f"quality.{key}")
            except ScorerUnavailable as e:
                self.skipped[key] = str(e)
                log.warning("quality filter: %s scorer skipped: %s", key, e)
        self.engine, self.digits = shared or load_judge(judge, engine, max_pixels, batch_size, num_gpus, tensor_parallel)

    def __call__(self, batch):
        return R.table(guarded("quality", R.rows_of(batch), self._run))

    def _run(self, rows: list[dict]) -> list[dict]:
        from aesformer.vcmp.judge import judge_probabilities

        datas = [R.info(r) for r in rows]
        items = []  # (pair, image)
        for row, data in zip(rows, datas):
            for p in _pairs_alive(data):
                items.append((p, _image(row, data["frames"][p["good"]]["image"])))
        if items:
            images = [im for _, im in items]
            n = len(images)
            # scores in [0, 1] (the thresholds' scale); a skipped scorer gives None
            got = {k: (self.scorers[k].normalised(images) if k in self.scorers else [None] * n)
                   for k in ("iqa", "aesthetic")}
            sharp = judge_probabilities(self.engine, "sharp", [[im] for im in images], self.digits)
            c = self.cfg
            said = lambda k, v: f"{k} skipped ({self.skipped[k]})" if v is None else f"{k} {v:.2f}"
            for (p, _), q, a, s in zip(items, got["iqa"], got["aesthetic"], sharp):
                p["scores"].update(iqa=None if q is None else round(float(q), 4),
                                   aesthetic=None if a is None else round(float(a), 4), sharp_vlm=round(float(s), 4))
                if q is not None and q < c.iqa_min:
                    _decide(p, "quality", False, f"iqa {q:.2f} < {c.iqa_min}")
                elif a is not None and a < c.aesthetic_min:
                    _decide(p, "quality", False, f"aesthetic {a:.2f} < {c.aesthetic_min}")
                elif s < c.vlm_threshold:
                    _decide(p, "quality", False, f"vlm: P(sharp, no ghosting) {s:.2f} < {c.vlm_threshold}")
                else:
                    _decide(p, "quality", True, f"{said('iqa', q)}, {said('aesthetic', a)}, P(sharp) {s:.2f}")
        return [R.with_info(r, d) for r, d in zip(rows, datas)]


# -- stage 8: overlay removal ------------------------------------------------------------------

class RemoveOverlays:
    """Edit the poor frame of each segment that still has pairs, verify each
    attempt (judge, overlay detector, fidelity), retry with a new seed."""

    def __init__(self, editor: str, judge: str, engine: str, overlay: Any, max_pixels: Optional[int] = None,
                 batch_size: int = 8, num_gpus: float = 0.0, seed: int = 0, image_format: str = "png",
                 tensor_parallel: int = 1, shared: Optional[tuple] = None):
        from aesformer.editor import CONDITION_AREA, CONTROL_AREA, Editor

        self.cfg = overlay
        self.seed = seed
        self.image_format = image_format
        device = _device(num_gpus)
        self.editor = Editor.load(editor, control_area=overlay.control_area or CONTROL_AREA,
                                  condition_area=overlay.condition_area or CONDITION_AREA,
                                  dtype="bfloat16" if device == "cuda" else "float32", device=device)
        self.engine, self.digits = shared or load_judge(judge, engine, max_pixels, batch_size, num_gpus, tensor_parallel)

    def _attempts(self, poor, key: int) -> tuple[Optional[Any], list[dict]]:
        from aesformer.vcmp.judge import judge_probabilities
        from aesformer.vcmp.overlays import verify_edit

        c = self.cfg
        log_ = []
        for a in range(c.attempts):
            seed = self.seed + 1000 * a + key
            edited = self.editor.edit(poor, c.prompt, seed=seed, steps=c.steps, true_cfg_scale=c.true_cfg_scale,
                                      negative_prompt=c.negative_prompt).resize(poor.size)
            p = float(judge_probabilities(self.engine, "clean", [[edited]], self.digits)[0])
            v = verify_edit(poor, edited, p, c.judge_threshold, c.detector_max, c.fidelity_min)
            log_.append({"attempt": a + 1, "seed": seed, **v})
            if v["passed"]:
                return edited, log_
        return None, log_

    def __call__(self, batch):
        return R.table(guarded("overlay", R.rows_of(batch), self._run))

    def _run(self, rows: list[dict]) -> list[dict]:
        import zlib

        out = []
        for row in rows:
            data = R.info(row)
            alive = _pairs_alive(data)
            if alive:
                poor = _image(row, data["frames"][0]["image"])
                key = zlib.crc32(f"{row['video_id']}/{row['segment_index']}".encode()) % 1000
                edited, attempts = self._attempts(poor, key)
                edit = {"attempts": attempts, "image": None}
                images = list(row["images"])
                if edited is not None:
                    edit["status"] = "edited"
                    edit["image"] = len(images)
                    images.append(R.encode(np.asarray(edited.convert("RGB")), self.image_format))
                    reason = f"overlays removed on attempt {len(attempts)}"
                elif self.cfg.keep_original_on_failure:
                    edit["status"] = "kept_original"
                    reason = f"all {len(attempts)} edits failed ({attempts[-1]['reason']}); kept the original poor frame"
                else:
                    edit["status"] = "failed"
                    reason = f"all {len(attempts)} edits failed ({attempts[-1]['reason']})"
                for p in alive:
                    last = attempts[-1]
                    p["scores"].update(edit_attempts=len(attempts), edit_judge=last["judge"],
                                       edit_detector=last["detector"], edit_fidelity=last["fidelity"])
                    _decide(p, "overlay", edit["status"] != "failed", reason)
                data["poor_edit"] = edit
                row = {**row, "images": images}
            out.append(R.with_info(row, data))
        return out


# -- stage 9: strict alignment -------------------------------------------------------------------

class CheckAlignment:
    """Judge: same person, scene and event, nothing new; geometry: ORB + RANSAC."""

    def __init__(self, judge: str, engine: str, align: Any, max_pixels: Optional[int] = None,
                 batch_size: int = 8, num_gpus: float = 0.0, tensor_parallel: int = 1, shared: Optional[tuple] = None):
        self.cfg = align
        self.engine, self.digits = shared or load_judge(judge, engine, max_pixels, batch_size, num_gpus, tensor_parallel)

    def __call__(self, batch):
        return R.table(guarded("align", R.rows_of(batch), self._run))

    def _run(self, rows: list[dict]) -> list[dict]:
        from aesformer.vcmp.align import geometric_check, plausible_transform
        from aesformer.vcmp.judge import judge_probabilities

        c = self.cfg
        datas = [R.info(r) for r in rows]
        items = []
        for row, data in zip(rows, datas):
            alive = _pairs_alive(data)
            if not alive:
                continue
            edit = data.get("poor_edit") or {}
            poor = _image(row, edit.get("image") if edit.get("image") is not None else data["frames"][0]["image"])
            for p in alive:
                items.append((p, poor, _image(row, data["frames"][p["good"]]["image"])))
        if items:
            probs = judge_probabilities(self.engine, "aligned", [[a, b] for _, a, b in items], self.digits)
            for (p, poor, good), pj in zip(items, probs):
                g = geometric_check(np.asarray(poor), np.asarray(good), c.orb_features, c.match_side)
                p["scores"].update(align_vlm=round(float(pj), 4), orb_inliers=float(g["inliers"]),
                                   orb_inlier_ratio=float(g["inlier_ratio"]), overlap=float(g["overlap"]))
                p["geometry"] = g
                ok, why = plausible_transform(g, c.min_inliers, c.min_inlier_ratio, c.min_overlap,
                                              (c.min_scale, c.max_scale), c.max_rotation_deg)
                if pj < c.judge_threshold:
                    _decide(p, "align", False, f"vlm: P(same person/scene/event) {pj:.2f} < {c.judge_threshold}")
                elif not ok:
                    _decide(p, "align", False, why)
                else:
                    _decide(p, "align", True, f"P(aligned) {pj:.2f}; {g['inliers']} inliers, overlap {g['overlap']:.2f}")
        return [R.with_info(r, d) for r, d in zip(rows, datas)]


# -- stages 5b to 9 in one actor -------------------------------------------------------------------

class MinePairs:
    """Good frames, good-image filtering, overlay removal and alignment in
    one actor that loads the judge once and hands rows from stage to stage
    in memory. For CPU machines: there a pool per stage costs a process and
    a model copy per stage, and a serialisation and a scheduling round per
    hop, for little work in each. Each stage keeps its own failure guard and
    its decisions, so the rows and the funnel are those of separate pools."""

    STAGES = ("good_frame", "quality", "overlay", "align")

    def __init__(self, judge: str, editor: str, engine: str, good: Any, quality: Any, overlay: Any, align: Any,
                 max_pixels: Optional[int] = None, batch_size: int = 16, num_gpus: float = 0.0, seed: int = 0,
                 image_format: str = "png", tensor_parallel: int = 1, cache_dir: Optional[str] = None):
        shared = load_judge(judge, engine, max_pixels, batch_size, num_gpus, tensor_parallel)
        kw = dict(judge=judge, engine=engine, max_pixels=max_pixels, batch_size=batch_size, num_gpus=num_gpus,
                  tensor_parallel=tensor_parallel, shared=shared)
        self.stages = [JudgeGoodFrames(good=good, **kw), FilterGoodImages(quality=quality, cache_dir=cache_dir, **kw),
                       RemoveOverlays(editor=editor, overlay=overlay, seed=seed, image_format=image_format, **kw),
                       CheckAlignment(align=align, **kw)]

    def __call__(self, batch):
        rows = R.rows_of(batch)
        for name, stage in zip(self.STAGES, self.stages):
            rows = guarded(name, rows, stage._run)
        return R.table(rows)

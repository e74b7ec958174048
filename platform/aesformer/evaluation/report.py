"""The evaluation report: numbers from the store, tables shaped like the
paper's Tables 1 and 2 (markdown and one self-contained HTML file), PNG
plots and a grid of cases.

:func:`summarise` turns verdicts, scores and votes into per-system figures;
:func:`markdown` and :func:`html` render them with the paper's figures beside
ours; :func:`plot_win_rates`, :func:`plot_scores` and :func:`case_grid` draw.
"""
from __future__ import annotations

import base64
import html as _html
import io
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from aesformer.evaluation import paper
from aesformer.evaluation.judge import OUTPUT_FIRST, REFERENCE_FIRST
from aesformer.evaluation.stats import TIE_RULE, cohen_kappa, outcome_value, position_bias, win_rate
from aesformer.evaluation.store import vote_outcome

REFERENCES = ("poor", "good")


def _label(value: float) -> str:
    return "win" if value > 0.5 else "loss" if value < 0.5 else "tie"


def summarise(systems: Sequence[Any], verdicts: Sequence[dict], scores: Sequence[dict],
              votes: Sequence[dict] = (), *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Per-system judged and human win rates (with 95% intervals), judge
    failures, position bias, mean scores per scorer, judge-human kappa."""
    by_cmp: dict[str, dict[str, dict]] = defaultdict(dict)
    for v in verdicts:
        by_cmp[v["key"]][v["ord"]] = v
    human: dict[str, list[str]] = defaultdict(list)
    for vote in votes:
        o = vote_outcome(vote)
        if o:
            human[vote["pair"]].append(o)
    out: dict[str, Any] = {"systems": {}, "tie_rule": TIE_RULE}
    for spec in systems:
        row: dict[str, Any] = {"label": spec.label, "table": spec.table, "paper": spec.paper,
                               "describe": spec.describe(), "thinker": spec.thinker, "editor": spec.editor,
                               "shuffle_dimensions": spec.shuffle_dimensions}
        judged_total, failed, requests = 0, [], 0
        bias_pairs = []
        kappa_judge, kappa_human = [], []
        for ref in REFERENCES:
            comps, hum = [], []
            for key, orders in by_cmp.items():
                system, _, _, reference = key.split("|")
                if system != spec.name or reference != ref:
                    continue
                # a comparison counts only when every order asked has a verdict: one
                # order alone of a both-orders comparison would bring the position bias back
                outs = [o["outcome"] for o in orders.values()]
                judged_total += len(orders)
                requests += sum(int(o["requests"] or 0) for o in orders.values())
                failed += [o for o in orders.values() if not o["outcome"]]
                outs = outs if all(outs) else []
                if outs:
                    comps.append(outs)
                if OUTPUT_FIRST in orders and REFERENCE_FIRST in orders:
                    a, b = orders[OUTPUT_FIRST]["verdict"], orders[REFERENCE_FIRST]["verdict"]
                    if a and b:
                        bias_pairs.append((a, b))
                if outs and key in human:
                    for h in human[key]:
                        kappa_judge.append(_label(outcome_value(outs)))
                        kappa_human.append(h)
            for key, hs in human.items():
                system, _, _, reference = key.split("|")
                if system == spec.name and reference == ref:
                    hum.append(hs)
            row[f"win_vs_{ref}"] = win_rate(comps, n_boot=n_boot, seed=seed)
            row[f"human_vs_{ref}"] = win_rate(hum, n_boot=n_boot, seed=seed) if hum else None
        row["judgements"], row["judge_requests"] = judged_total, requests
        row["judge_failures"] = len(failed)
        row["position_bias"] = position_bias(bias_pairs)
        row["kappa"] = cohen_kappa(kappa_judge, kappa_human, ["win", "tie", "loss"]) if kappa_judge else None
        row["kappa_n"] = len(kappa_judge)
        per_scorer: dict[str, list[float]] = defaultdict(list)
        for s in scores:
            if s["system"] == spec.name and s["value"] is not None:
                per_scorer[s["scorer"]].append(float(s["value"]))
        row["scores"] = {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}
                         for k, v in per_scorer.items()}
        out["systems"][spec.name] = row
    # the reference photos' own scores, for scale
    for ref in REFERENCES:
        vals: dict[str, list[float]] = defaultdict(list)
        for s in scores:
            if s["system"] == f"@{ref}" and s["value"] is not None:
                vals[s["scorer"]].append(float(s["value"]))
        out[f"{ref}_scores"] = {k: {"mean": float(np.mean(v)), "n": len(v)} for k, v in vals.items()}
    out["votes"] = len(votes)
    out["raters"] = len({v["rater"] for v in votes})
    return out


# -- tables --------------------------------------------------------------------------------

def _fmt_rate(r: Optional[dict]) -> str:
    if not r or r.get("rate") is None:
        return "n/a"
    return f"{r['rate']:.1f} [{r['lo']:.1f}, {r['hi']:.1f}] (n={r['n']})"


def _fmt(x: Optional[float], digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


_TITLES = {"win_vs_poor": "win vs poor % [95% CI]", "human_vs_poor": "human vs poor %",
           "win_vs_good": "win vs good % [95% CI]", "human_vs_good": "human vs good %"}
_THINKERS = {"none": "None", "trained": "trained thinker", "base": "base thinker", "sft": "SFT thinker",
             "endpoint": "endpoint"}


def _thinker(s: dict) -> str:
    if s.get("editor") == "identity":
        return "-"
    name = _THINKERS.get(s.get("thinker") or "none", s.get("thinker"))
    return name + (", shuffled order" if s.get("shuffle_dimensions") else "")


def table_rows(summary: dict, table: int, scorer_columns: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one table, in the paper's columns: each of our
    systems, then the paper's figure for it where it has one, then the
    paper's other rows. ``scorer_columns`` maps a paper column (laion,
    qalign, artimuse) to our scorer name. No rows when none of our systems
    belongs to the table."""
    cols = paper.TABLE_COLUMNS[table]
    with_thinker, with_kappa = table == 1, table == 1
    header = ["system", "source"] + (["thinker"] if with_thinker else [])
    header += [_TITLES.get(c) or paper.COLUMN_TITLES[c] for c in cols] + ["judge failures"]
    header += ["κ judge-human"] if with_kappa else []
    rows, shown = [], set()

    def paper_cells(name: str, ref: dict) -> list[str]:
        cells = [name, "paper"] + ([ref.get("thinker") or ""] if with_thinker else [])
        return cells + [_fmt(ref[c]) for c in cols] + [""] + ([""] if with_kappa else [])

    for s in summary["systems"].values():
        if s["table"] != table:
            continue
        cells = [s["label"], "ours"] + ([_thinker(s)] if with_thinker else [])
        for col in cols:
            if col in _TITLES:  # judged and human win rates
                cells.append(_fmt_rate(s[col]))
            else:
                sc = s["scores"].get(scorer_columns.get(col, ""))
                cells.append(_fmt(sc["mean"]) if sc else "n/a")
        cells += [str(s["judge_failures"])] + ([_fmt(s["kappa"])] if with_kappa else [])
        rows.append(cells)
        ref = paper.paper_row(table, s["paper"])
        if ref is not None:
            rows.append(paper_cells(s["paper"], ref))
            shown.add(s["paper"])
    if rows:
        rows += [paper_cells(name, ref) for name, ref in paper.TABLES[table].items() if name not in shown]
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _notes(summary: dict, meta: dict) -> list[str]:
    notes = [f"Ties: {summary['tie_rule']}.", "Intervals: percentile bootstrap over comparisons, 95%.",
             f"Paper figures (rows marked paper; its judge is GPT-4o): {paper.CITATION}. {paper.SOURCE} "
             "A figure not transcribed shows n/a."]
    judge = meta.get("judge") or {}
    notes.append("Judge: " + ", ".join(f"{k}={v}" for k, v in judge.items()))
    for name, status in (meta.get("scorers") or {}).items():
        notes.append(f"Scorer {name}: {status}")
    for ref in REFERENCES:
        sc = summary.get(f"{ref}_scores") or {}
        if sc:
            notes.append(f"The {ref} photos score " + ", ".join(f"{k} {v['mean']:.3f}" for k, v in sc.items()) + ".")
    bias = [f"{s['label']}: first-shown picked {_fmt(s['position_bias']['first_rate'])}, consistent "
            f"{_fmt(s['position_bias']['consistent'])} (n={s['position_bias']['n']})"
            for s in summary["systems"].values() if s["position_bias"]["n"]]
    if bias:
        notes.append("Position bias (comparisons asked in both orders): " + "; ".join(bias) + ".")
    if summary["votes"]:
        notes.append(f"Human ratings: {summary['votes']} votes from {summary['raters']} rater(s); "
                     "κ is Cohen's kappa between each vote and the judge's verdict on the same comparison.")
    else:
        notes.append("Human ratings: none yet (python jobs/rate.py study=<this folder>).")
    return notes


def markdown(summary: dict, meta: dict) -> str:
    cols = meta.get("scorer_columns") or {}
    parts = ["# AesFormer evaluation", ""]
    for table, title in ((1, "Table 1: systems"), (2, "Table 2: training stages")):
        header, rows = table_rows(summary, table, cols)
        if rows:
            parts += [f"## {title}", "", _md_table(header, rows), ""]
    other = sorted({k for s in summary["systems"].values() for k in s["scores"]} - set(cols.values()))
    if other:
        header = ["system"] + other
        rows = [[s["label"]] + [_fmt(s["scores"].get(k, {}).get("mean")) for k in other]
                for s in summary["systems"].values()]
        parts += ["## Other scores", "", _md_table(header, rows), ""]
    parts += ["## Notes", ""] + [f"- {n}" for n in _notes(summary, meta)] + [""]
    return "\n".join(parts)


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{_html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:100%">'


def html(summary: dict, meta: dict, images: Sequence[tuple[str, Path]] = ()) -> str:
    """One self-contained page: tables, notes, and the PNGs inlined as data URLs."""
    cols = meta.get("scorer_columns") or {}
    body = ["<h1>AesFormer evaluation</h1>"]
    for table, title in ((1, "Table 1: systems"), (2, "Table 2: training stages")):
        header, rows = table_rows(summary, table, cols)
        if not rows:
            continue
        body.append(f"<h2>{title}</h2><table><tr>" + "".join(f"<th>{_html.escape(h)}</th>" for h in header) + "</tr>")
        for r in rows:
            cls = ' class="paper"' if r[1] == "paper" else ""
            body.append(f"<tr{cls}>" + "".join(f"<td>{_html.escape(c)}</td>" for c in r) + "</tr>")
        body.append("</table>")
    body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_html.escape(n)}</li>" for n in _notes(summary, meta)) + "</ul>")
    for title, path in images:
        if Path(path).exists():
            body.append(f"<h2>{_html.escape(title)}</h2>{_img_tag(Path(path), title)}")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:4px 8px}tr.paper{color:#666;font-style:italic}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>AesFormer evaluation</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


# -- plots ---------------------------------------------------------------------------------

def plot_win_rates(summary: dict, path: Path) -> Optional[Path]:
    """Bars of the judged (and human) win rates with their 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["systems"])
    if not names:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.6 * len(names) * 2), 4), sharey=True)
    for ax, ref in zip(axes, REFERENCES):
        for j, (kind, colour) in enumerate((("win", "tab:blue"), ("human", "tab:orange"))):
            xs, ys, err = [], [], [[], []]
            for i, n in enumerate(names):
                r = summary["systems"][n].get(f"{kind}_vs_{ref}")
                if r and r.get("rate") is not None:
                    xs.append(i + 0.38 * j), ys.append(r["rate"])
                    err[0].append(r["rate"] - r["lo"]), err[1].append(r["hi"] - r["rate"])
            if xs:
                ax.bar(xs, ys, width=0.36, yerr=err, capsize=3, color=colour,
                       label="judge" if kind == "win" else "human")
        ax.axhline(50, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(names)), [summary["systems"][n]["label"] for n in names], rotation=30, ha="right",
                      fontsize=8)
        ax.set_title(f"win rate vs {ref} photo (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_scores(scores: Sequence[dict], labels: dict[str, str], path: Path) -> Optional[Path]:
    """Box plots of each scorer's scores per system (and the poor/good photos)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scorers = sorted({s["scorer"] for s in scores})
    if not scorers:
        return None
    fig, axes = plt.subplots(1, len(scorers), figsize=(4.5 * len(scorers), 4), squeeze=False)
    for ax, sc in zip(axes[0], scorers):
        groups = defaultdict(list)
        for s in scores:
            if s["scorer"] == sc and s["value"] is not None:
                groups[s["system"]].append(s["value"])
        names = list(groups)
        ax.boxplot([groups[n] for n in names])
        ax.set_xticks(range(1, len(names) + 1), [labels.get(n, n) for n in names], rotation=30, ha="right",
                      fontsize=8)
        ax.set_title(sc)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def case_grid(cases: Sequence[dict], columns: Sequence[str], path: Path, thumb: int = 160) -> Optional[Path]:
    """Rows of cases: poor | each system | good. ``cases``: ``{"photo", "images": {column: PIL}}``."""
    from PIL import Image, ImageDraw

    if not cases:
        return None
    pad, label_h = 4, 16
    w = len(columns) * (thumb + pad) + pad
    h = len(cases) * (thumb + pad) + pad + label_h
    sheet = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(sheet)
    for j, col in enumerate(columns):
        draw.text((pad + j * (thumb + pad), 2), col[: thumb // 6], fill="black")
    for i, case in enumerate(cases):
        for j, col in enumerate(columns):
            im = case["images"].get(col)
            if im is None:
                continue
            im = im.convert("RGB").copy()
            im.thumbnail((thumb, thumb))
            sheet.paste(im, (pad + j * (thumb + pad), label_h + pad + i * (thumb + pad)))
    sheet.save(path)
    return Path(path)


def png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()

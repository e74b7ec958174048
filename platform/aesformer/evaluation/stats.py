"""Win rates, bootstrap intervals, position bias and agreement.

An *outcome* is what one judgement says about the system's output against a
reference photo: ``"win"``, ``"tie"`` or ``"loss"``. A tie counts as half a
win (the report says so), so an output identical to the reference scores
50% whatever the judge does with ties. A comparison asked in both A/B
orders scores the mean of its two outcomes: that cancels the judge's
position bias. The win rate is the mean over comparisons; its 95% interval
is the percentile bootstrap over comparisons.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

OUTCOME_VALUE = {"win": 1.0, "tie": 0.5, "loss": 0.0}
TIE_RULE = ("a tie counts as half a win; a comparison asked in both A/B orders scores the mean of the two; "
            "a comparison with a failed judgement is left out (and counted under judge failures)")


def outcome_value(outcomes: Sequence[str]) -> float:
    """The score of one comparison from its outcomes (one per order asked)."""
    vals = [OUTCOME_VALUE[o] for o in outcomes if o in OUTCOME_VALUE]
    if not vals:
        raise ValueError(f"no usable outcome among {list(outcomes)!r}")
    return float(np.mean(vals))


def bootstrap_ci(values: Sequence[float], *, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling
    the values with replacement ``n_boot`` times)."""
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def win_rate(comparisons: Sequence[Sequence[str]], *, n_boot: int = 2000, seed: int = 0) -> dict:
    """``comparisons``: the outcomes of each comparison (one per order asked).

    Returns ``{rate, lo, hi, n, wins, ties, losses}`` with rates in percent;
    ``wins``/``ties``/``losses`` count single judgements.
    """
    values = [outcome_value(c) for c in comparisons if any(o in OUTCOME_VALUE for o in c)]
    flat = [o for c in comparisons for o in c]
    counts = {"wins": flat.count("win"), "ties": flat.count("tie"), "losses": flat.count("loss")}
    if not values:
        return {"rate": None, "lo": None, "hi": None, "n": 0, **counts}
    lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    return {"rate": 100 * float(np.mean(values)), "lo": 100 * lo, "hi": 100 * hi, "n": len(values), **counts}


def position_bias(pairs: Iterable[tuple[str, str]]) -> dict:
    """Position bias from comparisons asked in both orders.

    ``pairs``: for each such comparison, the verdicts ``("A"|"B"|"tie", ...)``
    with the output shown first, then with the reference shown first.
    Returns ``first_rate`` (share of non-tie verdicts that pick the image
    shown first; 0.5 means no bias), ``consistent`` (share of comparisons
    whose two verdicts name the same image, ties agreeing with ties) and ``n``.
    """
    firsts, decided, consistent, n = 0, 0, 0, 0
    for v_out_first, v_ref_first in pairs:
        n += 1
        for v in (v_out_first, v_ref_first):
            if v in ("A", "B"):
                decided += 1
                firsts += v == "A"
        same = {("A", "B"), ("B", "A"), ("tie", "tie")}
        consistent += (v_out_first, v_ref_first) in same
    return {"first_rate": firsts / decided if decided else None,
            "consistent": consistent / n if n else None, "n": n}


def cohen_kappa(a: Sequence[str], b: Sequence[str], labels: Optional[Sequence[str]] = None) -> Optional[float]:
    """Cohen's kappa of two raters' labels on the same items:
    (p_observed − p_chance) / (1 − p_chance). ``None`` without items;
    1.0 when both raters use one and the same label throughout."""
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa needs as many labels from each rater, got {len(a)} and {len(b)}")
    if not a:
        return None
    labels = list(labels) if labels is not None else sorted(set(a) | set(b))
    idx = {k: i for i, k in enumerate(labels)}
    m = np.zeros((len(labels), len(labels)))
    for x, y in zip(a, b):
        m[idx[x], idx[y]] += 1
    m /= m.sum()
    po = float(np.trace(m))
    pe = float((m.sum(axis=1) * m.sum(axis=0)).sum())
    if pe >= 1.0:
        return 1.0 if po >= 1.0 else 0.0
    return (po - pe) / (1 - pe)

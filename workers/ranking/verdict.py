"""What a finished ranking lets a user conclude: pure functions over the scores and the paired bootstrap replicates.

The verdict says which model is first, whether the data can tell it from the others (paired bootstrap over the
same resampled rows), which models do not beat the labels-only baseline, which estimators are saturated or tied on
this data (H-score reaches C - 1 and SFDA 1 when there are fewer rows than feature dimensions), and how the
ranking compares with the static baseline of ordering by parameter count, which on some benchmarks beats every
published estimator (Singh, Hess & Vanschoren, ICLR 2026).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import kendalltau

CONFIDENCE = 0.95


def p_better(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of paired replicates in which `a` scores above `b` (ties count one half)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    diff = diff[np.isfinite(diff)]
    if diff.size == 0:
        return 0.5
    return float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))


def degenerate_estimators(scores: Mapping[str, Mapping[str, float | None]], estimators: Sequence[str]) -> list[str]:
    """Estimators whose best score is shared by two or more models (saturated or tied): they cannot pick a top."""
    out = []
    for name in estimators:
        values = np.array([s.get(name) for s in scores.values() if s.get(name) is not None], dtype=np.float64)
        values = values[np.isfinite(values)]
        if len(values) >= 2 and np.isclose(values, values.max(), rtol=1e-6, atol=1e-9).sum() >= 2:
            out.append(name)
    return out


def static_baseline(order: Sequence[str], parameters: Mapping[str, int | None]) -> dict[str, Any]:
    """The ranking against the order by parameter count (largest first): whether they agree on the top and their
    Kendall tau over the models whose size is known."""
    known = [m for m in order if parameters.get(m)]
    if len(known) < 2:
        return {"by": "parameters", "available": False}
    by_size = sorted(known, key=lambda m: -int(parameters[m] or 0))
    tau = kendalltau([known.index(m) for m in known], [by_size.index(m) for m in known]).statistic
    return {"by": "parameters", "available": True, "top": by_size[0], "agrees_on_top": by_size[0] == known[0],
            "kendall_tau": None if not np.isfinite(tau) else float(tau), "models": len(known)}


def ranking_verdict(order: Sequence[str], names: Mapping[str, str], estimator: str,
                    replicates: Mapping[str, np.ndarray] | None, scores: Mapping[str, Mapping[str, float | None]],
                    prior: float | None, parameters: Mapping[str, int | None], rows: int,
                    confidence: float = CONFIDENCE, behind: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The verdict of a ranking. `order`: model ids best first (scored by `estimator`); `replicates`: that
    estimator's paired bootstrap replicates per model id (None without a bootstrap); `scores`: every estimator's
    score per model id; `prior`: LogME of the labels-only baseline (None when LogME was not computed);
    `behind`: P(top better) of models already judged behind it elsewhere (successive halving's eliminated ones)."""
    scored = [m for m in order if scores[m].get(estimator) is not None]
    if not scored:
        return {"top": None, "confident": False, "indistinguishable_from_top": [], "below_prior": [],
                "degenerate_estimators": [], "static_baseline": static_baseline([], parameters),
                "p_top_beats": {}, "summary": f"No model could be scored by {estimator}."}
    top = scored[0]
    p_top = ({m: p_better(replicates[top], replicates[m]) for m in scored[1:] if m in replicates}
             if replicates and top in replicates else {})
    p_top.update({m: float(p) for m, p in (behind or {}).items() if m in scored[1:] and m not in p_top})
    tied = [m for m in scored[1:] if m not in p_top or p_top[m] < confidence]
    below = [] if prior is None else [m for m in order if scores[m].get("logme") is not None
                                      and scores[m]["logme"] <= prior]
    verdict = {"top": top, "confident": bool(p_top) and not tied, "indistinguishable_from_top": tied,
               "below_prior": below, "degenerate_estimators": degenerate_estimators(scores, list(scores[top])),
               "static_baseline": static_baseline(order, parameters), "p_top_beats": p_top}
    verdict["summary"] = summary(verdict, names, estimator, len(scored), rows)
    return verdict


def summary(verdict: Mapping[str, Any], names: Mapping[str, str], estimator: str, scored: int, rows: int) -> str:
    """One plain sentence a user can act on."""
    top = names.get(verdict["top"], verdict["top"])
    tied = verdict["indistinguishable_from_top"]
    if scored == 1:
        text = f"{top} is the only model scored by {estimator}"
    elif verdict["confident"]:
        text = f"{top} ranks first by {estimator}, above every other model with probability >= {CONFIDENCE:g}"
    else:
        text = (f"{top} ranks first by {estimator}, but {len(tied)} other model(s) cannot be told apart from it on "
                f"these {rows} rows (treat them as tied, or rank on more rows)")
    if estimator in verdict["degenerate_estimators"]:
        text += f"; {estimator} is saturated or tied here, so its order says little"
    below = verdict["below_prior"]
    if below and len(below) == len(names):
        text += ("; no model's LogME beats the labels-only baseline, so LogME cannot tell them apart here "
                 "(rank by ridge_loo)")
    elif below:
        text += f"; {len(below)} model(s) do not beat the labels-only baseline by LogME"
    baseline = verdict["static_baseline"]
    if baseline.get("available") and not baseline["agrees_on_top"]:
        text += f"; ordering by size alone would pick {names.get(baseline['top'], baseline['top'])}"
    return text + "."

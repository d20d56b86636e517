"""Paired bootstrap uncertainty for transferability scores.

Every model is scored on the SAME resampled rows in each replicate, so the difference between two
models is judged on equal data (paired), which is what "is 0.83 vs 0.81 a real difference?" asks.
Classification resamples within each class (stratified): class counts stay fixed, so no class goes
missing and scores stay comparable across replicates.

LogME fast path (`LogMEMetric`): instead of refitting B times, each row's leave-one-out log predictive density at
LogME's fit is computed once (`logme_loo_terms`, closed form from the same eigendecomposition) and replicate scores
are score + sum_i (c_i - 1) l_i / N: cost ~2 LogME fits per model whatever B is. Measured against the spread of the
score over independent samples of the same size (benchmarks/logme_intervals.py), these replicates are right within
about 20% from N = 300 rows on, both when N <= D and when N > D. `method="influence"` uses each row's exact
derivative of the evidence instead (first-order / delta-method bootstrap): it agrees with them when N >> D but is
overconfident when features are wide for the sample (0.75-0.8 of the real spread at N = 1000, D = 384; 0.3-0.6 at
N <= D, where every row is fitted exactly and the influence of every row is about the same).
`LogMEMetric(method="refit")` refits exactly on count-weighted sufficient statistics (`logme_weighted`: F^T diag(c) F
over the drawn rows only, F is never re-copied as F[idx]); `method="subsample"` refits on each resample's distinct
rows (a delete-d jackknife), which the default takes below 100 rows when N <= D (see `LogMEMetric`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from workers.ranking.logme import logme
from workers.ranking.logme_variants import logme_influence, logme_loo_terms, logme_weighted
from workers.ranking.probe import quality_from_rows, ridge_loo, ridge_loo_rows

# Below this many rows, and with no more rows than feature dimensions, LogME's intervals come from subsample refits.
SUBSAMPLE_BELOW_ROWS = 100


class LogMEMetric:
    """Callable `(features, labels) -> LogME score` that the bootstrap can evaluate fast.

    method "auto" (the default) is "loo", except with fewer than SUBSAMPLE_BELOW_ROWS rows and N <= D, where it is
    "subsample" (refits of fewer than 100 rows cost well under a millisecond each).
    "loo": replicate = score + sum_i (c_i - 1) l_i / N with l_i row i's leave-one-out log predictive density at
    LogME's fit (`logme_loo_terms`): how well the other rows predict each row, which varies from row to row even
    when every row is fitted. One fit per model. With a handful of rows it is overconfident: two models of
    pure-noise 384-d features were called different with P >= 0.95 in 23/8/5 of 40 trials at 4/6/10 rows (2 would
    be right), against 6/7/3 with subsample refits; from 20 rows on 2-3 of 40.
    "influence": l_i replaced by the row's exact influence on the maximised evidence (`logme_influence`). When N <= D
    the features can fit a target exactly, LogME's optimum sits at or near beta -> inf, every row's influence is
    about the same (the fit passes through each point), and these replicates collapse to a false certainty (seen on
    25 kaomoji: 6 of 7 wrongly ordered pairs "certain"); at N = 1000, D = 384 they were still 0.75-0.8 of the real
    spread, where leave-one-out replicates were 1.00-1.03.
    "subsample": refits on the distinct rows of each resample (about 0.63 N, no repeats, so the evidence stays
    bounded), the delete-d jackknife, spread scaled by sqrt(m / (N - m)) to N rows and centred on the point score;
    one eigendecomposition per resample. When N > D it is far too wide for narrow features (5-10x the real spread
    of a 32-d model's score on Austen at 50-400 rows). Its spread and the leave-one-out one agree within about 10% on
    Fashion-MNIST (D = 1280) and BBC News (D = 32, 384) at N = 300-1000, at 1/20-1/40 of the time
    (benchmarks/RESULTS.md, logme_intervals).
    "refit": exact refits on count-weighted sufficient statistics (`logme_weighted`); only sound when N >> D.
    """

    METHODS = ("auto", "influence", "loo", "refit", "subsample")

    def __init__(self, task: str = "classification", method: str = "auto", num_classes: int | None = None) -> None:
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {', '.join(self.METHODS)}")
        self.task, self.method, self.num_classes = task, method, num_classes

    def resolved_method(self, n_rows: int, dim: int) -> str:
        if self.method != "auto":
            return self.method
        return "subsample" if n_rows <= dim and n_rows < SUBSAMPLE_BELOW_ROWS else "loo"

    def __call__(self, features: np.ndarray, labels: np.ndarray) -> float:
        return logme(features, labels, self.task, num_classes=self.num_classes, compute_weights=False).score

    def _subsample_score(self, features: np.ndarray, labels: np.ndarray, full_per_target: np.ndarray) -> float:
        """LogME of a subsample. A multi-label resample (not stratified: labels overlap) can miss a rare label
        altogether, and LogME of an all-zero target is unbounded: such a target keeps its full-data evidence in
        this replicate (it adds no spread), the others are refitted."""
        if self.task == "multilabel":
            present = np.asarray(labels).any(axis=0)
            if not present.all():
                per_target = full_per_target.copy()
                refit = logme(features, np.asarray(labels)[:, present], "multilabel", compute_weights=False)
                per_target[present] = refit.evidence_per_target
                return float(per_target.mean())
        return self(features, labels)

    def replicates(self, features: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> tuple[float, np.ndarray]:
        """Point score and the (B,) replicate scores for count matrix counts (B, N)."""
        n = features.shape[0]
        method = self.resolved_method(n, features.shape[1])
        if method in ("influence", "loo"):
            per_row = logme_influence if method == "influence" else logme_loo_terms
            score, psi = per_row(features, labels, self.task, num_classes=self.num_classes)
            return score, score + (counts - 1.0) @ psi / n
        if method == "subsample":
            full = logme(features, labels, self.task, num_classes=self.num_classes, compute_weights=False)
            score = full.score
            reps = np.empty(len(counts))
            scale = np.empty(len(counts))
            for b, c in enumerate(counts):
                rows = np.flatnonzero(c > 0)
                reps[b] = self._subsample_score(features[rows], labels[rows], full.evidence_per_target)
                scale[b] = np.sqrt(len(rows) / max(n - len(rows), 1))
            return score, score + scale * (reps - reps.mean())
        score = self(features, labels)
        reps = np.array([logme_weighted(features, labels, c, self.task, num_classes=self.num_classes).score
                         for c in counts])
        return score, reps


class RidgeLOOMetric:
    """`ridge_loo` for the paired bootstrap: each row's leave-one-out outcome is computed once on all rows and the
    replicates re-weight those outcomes by the resample's counts. Refitting on a resample would let a repeated row
    predict itself from its copy (a leave-one-out of duplicated data is not held out)."""

    method = "loo-rows"

    def __init__(self, task: str = "classification") -> None:
        self.task = task

    def __call__(self, features: np.ndarray, labels: np.ndarray) -> float:
        return ridge_loo(features, labels, self.task)

    def replicates(self, features: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> tuple[float, np.ndarray]:
        fit = ridge_loo_rows(features, labels, self.task)
        return fit.score, np.array([quality_from_rows(fit.rows, self.task, c) for c in counts])


def resample_counts(labels: np.ndarray | None, n: int, n_boot: int, rng: np.random.Generator,
                    stratify: bool) -> np.ndarray:
    """(B, N) multinomial counts; stratified by label when asked (each class resampled in itself)."""
    counts = np.zeros((n_boot, n))
    if not stratify:
        for b in range(n_boot):
            counts[b] = np.bincount(rng.integers(0, n, n), minlength=n)
        return counts
    groups = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    for b in range(n_boot):
        for g in groups:
            counts[b, g] = np.bincount(rng.integers(0, len(g), len(g)), minlength=len(g))
    return counts




def bootstrap_scores(
    metric_fn: Callable[[np.ndarray, np.ndarray], float] | Any,
    features_by_model: dict[str, np.ndarray],
    labels: np.ndarray,
    n_boot: int = 200,
    seed: int = 0,
    *,
    stratify: bool | None = None,
    level: float = 0.95,
) -> dict[str, Any]:
    """Paired bootstrap of `metric_fn` for several models on the same labelled rows.

    Returns {
      "point": {model: score on all rows},
      "intervals": {model: (low, high)} percentile interval at `level`,
      "order": models by point score, best first,
      "p_better_than_next": {model: fraction of replicates in which it scores above the next model
                             in that order (ties count 1/2); absent for the last model},
      "replicates": {model: (B,) array}, "n_boot": B,
      "method": "auto" | "influence" | "loo" | "refit" | "subsample" | "resample",
    }
    stratify defaults to True when labels are 1-D integers (classification).
    """
    y = np.asarray(labels)
    n = y.shape[0]
    if stratify is None:
        stratify = y.ndim == 1 and np.issubdtype(y.dtype, np.integer)
    rng = np.random.default_rng(seed)
    counts = resample_counts(y if stratify else None, n, n_boot, rng, stratify)

    point: dict[str, float] = {}
    reps: dict[str, np.ndarray] = {}
    fast = hasattr(metric_fn, "replicates")
    if not fast:
        # generic metric: materialise each resample (same rows for every model)
        idx_by_b = [np.repeat(np.arange(n), c.astype(np.int64)) for c in counts]
    for name, feats in features_by_model.items():
        f = np.asarray(feats)
        if f.shape[0] != n:
            raise ValueError(f"{name}: {f.shape[0]} feature rows for {n} labels")
        if fast:
            point[name], reps[name] = metric_fn.replicates(f, y, counts)
        else:
            point[name] = float(metric_fn(f, y))
            reps[name] = np.array([metric_fn(f[idx], y[idx]) for idx in idx_by_b], dtype=np.float64)
            # A resample repeats rows, and estimators that depend on distinct rows (TransRate's coding rate,
            # H-score's covariance) shift under repetition: keep the spread, re-centre on the point estimate.
            reps[name] = reps[name] + (point[name] - float(np.nanmedian(reps[name])))

    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    intervals = {k: (float(np.nanpercentile(v, lo_q)), float(np.nanpercentile(v, hi_q))) for k, v in reps.items()}
    order = sorted(point, key=lambda k: point[k], reverse=True)
    p_next = {}
    for a, b in zip(order, order[1:]):
        diff = reps[a] - reps[b]
        p_next[a] = float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))
    return {
        "point": point,
        "intervals": intervals,
        "order": order,
        "p_better_than_next": p_next,
        "replicates": reps,
        "n_boot": int(n_boot),
        "method": getattr(metric_fn, "method", "resample"),
    }

"""Leave-one-out quality of a closed-form ridge probe on frozen features (`ridge_loo`).

Why it is here: LogME scores a model by the Gaussian evidence of one-hot (or real) targets. On hard classification
data with a few hundred rows (benchmarks/occam_likelihood.py: which Austen novel a line is from), that likelihood is
nearly blind to what fine-tuning rewards: a randomly initialised model and pretrained ones get about the same
evidence, with or without LogME's Occam charge, while held-out *accuracy* tells them apart. `ridge_loo` measures
that accuracy directly and exactly, with no training loop: a ridge regression of the targets on the features with
an unpenalised intercept is a linear smoother Y_hat = H Y, so every leave-one-out prediction comes from one fit,

    y_hat(-i) = (y_hat_i - H_ii y_i) / (1 - H_ii),

and one eigendecomposition (the smaller Gram matrix of the centred features) serves every ridge strength tried.
The strength is picked from a fixed grid, relative to the mean eigenvalue, by the same leave-one-out quality (a
small optimism shared by every model). Quality: accuracy of the argmax (classification), micro-F1 at 0.5
(multi-label), 1 - PRESS / total sum of squares (regression).

`ridge_loo_rows` also returns each row's leave-one-out outcome, so a paired bootstrap resamples held-out outcomes
(RidgeLOOMetric in uncertainty.py) instead of refitting on resamples whose repeated rows would predict themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workers.ranking.targets import make_targets

# Ridge strengths tried, as multiples of the mean non-zero eigenvalue of the centred Gram matrix.
RELATIVE_STRENGTHS = 10.0 ** np.arange(-4.0, 3.5, 1.0)


@dataclass
class RidgeLOO:
    score: float  # leave-one-out quality at the chosen strength
    strength: float  # chosen ridge strength (absolute)
    rows: np.ndarray  # per-row outcomes: (N,) correct 0/1 | (N, 3) tp, fp, fn | (N, 2) squared error, squared dev.
    task: str


def _targets(labels: np.ndarray, task: str) -> np.ndarray:
    """LogME's (N, T) target matrix; class labels of any kind are first mapped to the classes present."""
    if task == "classification":
        labels = np.unique(np.asarray(labels).reshape(-1), return_inverse=True)[1]
    return make_targets(labels, task)


def quality_from_rows(rows: np.ndarray, task: str, weights: np.ndarray | None = None) -> float:
    """The probe's quality from per-row outcomes, each row counted `weights[i]` times (a bootstrap resample)."""
    w = np.ones(rows.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    if task == "classification":
        return float(w @ rows / w.sum())
    if task == "multilabel":
        tp, fp, fn = w @ rows
        return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn > 0 else 0.0
    sq_err, sq_dev = w @ rows
    return float(1.0 - sq_err / sq_dev) if sq_dev > 0 else 0.0


def _outcomes(loo: np.ndarray, y: np.ndarray, yc: np.ndarray, task: str) -> np.ndarray:
    """Per-row outcomes of leave-one-out predictions (see RidgeLOO.rows)."""
    if task == "classification":
        return (loo.argmax(axis=1) == y.argmax(axis=1)).astype(np.float64)
    if task == "multilabel":
        pred, true = loo > 0.5, y > 0.5
        return np.stack([(pred & true).sum(1), (pred & ~true).sum(1), (~pred & true).sum(1)], 1).astype(float)
    return np.stack([((loo - y) ** 2).sum(1), (yc ** 2).sum(1)], 1)


def ridge_loo_rows(features: np.ndarray, labels: np.ndarray, task: str = "classification",
                   relative_strengths: np.ndarray = RELATIVE_STRENGTHS, block_rows: int = 4096) -> RidgeLOO:
    """Exact leave-one-out quality of ridge regression (unpenalised intercept) at the best strength of a grid.

    With N >= D the rows are processed in blocks of block_rows, so memory stays O(block_rows * D) however many
    rows there are (a 50,000 x 2048 feature matrix would otherwise need two more copies of itself)."""
    f = np.asarray(features, dtype=np.float64)
    y = _targets(labels, task)
    n, d = f.shape
    if n < 3 or y.shape[0] != n:
        raise ValueError(f"ridge_loo needs at least 3 rows and one label per row, got {n} rows, {y.shape[0]} labels")
    fc = f - f.mean(axis=0)
    y_mean = y.mean(axis=0)
    yc = y - y_mean
    if n >= d:
        s, basis = np.linalg.eigh(fc.T @ fc)
        gy = basis.T @ (fc.T @ yc)  # (D, T): targets in the eigenbasis of the centred features
    else:
        s, basis = np.linalg.eigh(fc @ fc.T)  # H = U diag(s / (s + lam)) U^T
        gy = basis.T @ yc
    s = np.maximum(s, 0.0)
    scale = float(s[s > s.max() * 1e-12].mean()) if s.max() > 0 else 1.0
    lams = np.asarray(relative_strengths, dtype=np.float64) * scale
    # the smoother's gain per eigen-direction for each strength, (J, k)
    gains = 1.0 / (s[None, :] + lams[:, None]) if n >= d else s[None, :] / (s[None, :] + lams[:, None])
    outcomes: list[list[np.ndarray]] = [[] for _ in lams]
    for start in range(0, n, block_rows if n >= d else n):
        rows = slice(start, min(start + block_rows, n) if n >= d else n)
        g = fc[rows] @ basis if n >= d else basis  # (B, k): the block's rows in the eigenbasis
        g2 = g * g
        for j, gain in enumerate(gains):
            fitted = g @ (gain[:, None] * gy) + y_mean
            leverage = np.minimum(g2 @ gain + 1.0 / n, 1.0 - 1e-12)  # the intercept adds 1/N to every H_ii
            loo = y_mean + (fitted - y_mean - leverage[:, None] * yc[rows]) / (1.0 - leverage)[:, None]
            outcomes[j].append(_outcomes(loo, y[rows], yc[rows], task))
    best: RidgeLOO | None = None
    for lam, parts in zip(lams, outcomes):
        per_row = np.concatenate(parts)
        score = quality_from_rows(per_row, task)
        if best is None or score > best.score:
            best = RidgeLOO(score, float(lam), per_row, task)
    assert best is not None
    return best


def ridge_loo(features: np.ndarray, labels: np.ndarray, task: str = "classification") -> float:
    """Leave-one-out accuracy / micro-F1 / R^2 of a ridge probe on the features (see module docstring)."""
    return ridge_loo_rows(features, labels, task).score

"""LogME: exact maximum log-evidence of a Bayesian linear model on frozen features.

Model per target column y (N values) with features F (N x D):
    y = F w + eps,  w ~ N(0, 1/alpha I_D),  eps ~ N(0, 1/beta I_N)
    log p(y | F, alpha, beta) = D/2 log alpha + N/2 log beta - 1/2 sum_{i=1..D} log(alpha + beta s_i)
                                - beta/2 ||F m - y||^2 - alpha/2 ||m||^2 - N/2 log(2 pi)
with s_i ALL D eigenvalues of F^T F (zeros included) and m = beta (alpha I + beta F^T F)^-1 F^T y.
The score is max_{alpha,beta} log p / N, averaged over targets (You et al., ICML 2021 / JMLR 2022).

How it is computed (why it is fast and exact):
- One symmetric eigendecomposition serves every target: of F^T F (D x D) when N >= D, else of F F^T
  (N x N); in the second case the D - N extra eigenvalues of F^T F are exactly zero and are counted
  through (D - rank) log alpha, which the thuml reference's default solver drops (it inflates the
  score when D > N).
- With lam = alpha / beta and b = V^T F^T y, everything the fixed point needs is an O(D) sum per target:
  ||m||^2 = sum b^2/(lam+s)^2 and E(lam) = ||y - F m||^2 + lam ||m||^2 = ||y||^2 - sum b^2/(lam+s),
  so no N x D product is ever redone inside the loop.
- beta has a closed form given lam (beta = N / E(lam)); what remains is a 1-D maximisation over
  t = log lam, solved for all targets at once by safeguarded Newton steps. Its stationary point is
  exactly the MacKay fixed point (gamma = sum beta s/(alpha+beta s), alpha = gamma/||m||^2,
  beta = (N-gamma)/||F m - y||^2); `solver="mackay"` runs the plain MacKay iteration instead
  (linear convergence, kept for cross-checking). Both solvers are in logme_solvers.py.

Targets: classification -> one one-hot column per class; multilabel -> one 0/1 column per label;
regression -> one column per output, used as given (NOT standardised: the evidence is a density of y,
so rescaling a target by c shifts its per-sample score by -log|c|; standardise before calling if you
want scale-free scores across datasets; ranking models on one dataset is unaffected by the scale, but not by
the mean, since no bias is fitted: rank jobs standardise regression targets, see workers.pipeline.ranking_targets).
No bias column is added (as in the reference); append a column of ones to F if you want one.

This file is the method, in the shape of thuml/LogME's LogME.py: one eigendecomposition of the features
(`spectrum`), the evidence and posterior means at a given lam (`evidence`, `posterior_means`), and `logme`, which
maximises the evidence per target column. Beside it: logme_solvers.py (the maximisation over lam),
logme_variants.py (weighted, leave-one-out, influence, projected, prior-only), logme_torch.py (the same spectrum on
a GPU), targets.py (labels to target columns).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from workers.ranking.logme_solvers import SOLVER_TOL, solve
from workers.ranking.targets import (
    SPARSE_ONE_HOT_CLASSES,
    class_codes,
    make_targets,
    one_hot_transposed,
    transpose_times,
)

_LOG_2PI = float(np.log(2.0 * np.pi))


@dataclass
class LogMEResult:
    score: float  # mean over targets of max log-evidence / N
    weights: np.ndarray  # (T, D) posterior means m, one row per target (B-Tuning uses them)
    evidence_per_target: np.ndarray  # (T,) max log-evidence / N
    alpha: np.ndarray  # (T,) prior precision at the optimum
    beta: np.ndarray  # (T,) noise precision at the optimum
    iterations: int  # solver iterations until every target converged
    converged: bool = True


class Spectrum:
    """Eigen-data shared by all targets: eigenvalues s (k,), projections of the targets on the eigen-directions
    (proj (k, T), their squares p2 (T, k)), ||y||^2 per target, and the mode: "gram_d" (eigenvectors of F^T F,
    N >= D) or "gram_n" (of F F^T, N < D). n: the rows (or sample directions kept), d: the feature width."""

    def __init__(self, s: np.ndarray, proj: np.ndarray, yy: np.ndarray, mode: str, n: float, d: int) -> None:
        self.s = s
        self.proj = proj  # (k, T): V^T F^T Y (gram_d) or U^T Y (gram_n)
        self.p2 = np.ascontiguousarray((proj * proj).T)  # (T, k)
        self.yy = yy  # (T,) ||y||^2
        self.mode = mode
        self.n = n
        self.d = d


def spectrum(f: np.ndarray, y: Any, yy: np.ndarray | None = None) -> tuple[Spectrum, np.ndarray]:
    """The spectrum of features f (N, D) for targets y, and its basis: the eigenvectors V of F^T F (D, D) when
    N >= D, else the kept eigenvectors U of F F^T (N, k). y: targets (N, T), or a sparse (T, N) Y^T for one-hot
    targets (then yy must be given)."""
    n, d = f.shape
    if yy is None:
        yy = np.einsum("nt,nt->t", y, y)
    if n >= d:
        g = f.T @ f  # numpy dispatches A.T @ A to syrk
        s, v = np.linalg.eigh(g)
        s = np.maximum(s, 0.0)  # round-off can make zero eigenvalues slightly negative
        proj = v.T @ transpose_times(f, y)  # (D, T)
        sp = Spectrum(s, proj, yy, "gram_d", n, d)
        return sp, v
    k = f @ f.T
    s, u = np.linalg.eigh(k)
    s = np.maximum(s, 0.0)
    keep = kept_sample_directions(s)
    s, u = s[keep], u[:, keep]
    proj = transpose_times(u, y)  # (N', T)
    sp = Spectrum(s, proj, np.einsum("kt,kt->t", proj, proj), "gram_n", int(keep.sum()), d)
    return sp, u


# An eigenvalue of F F^T below this fraction of the largest is a sample-space direction the features cannot see.
NULL_DIRECTION_TOL = 1e-9


def kept_sample_directions(s: np.ndarray) -> np.ndarray:
    """Mask of the eigen-directions of F F^T (N < D) that LogME keeps.

    Rows of F that coincide (a text repeated, or texts that tokenise alike, e.g. strings of [UNK]) or are otherwise
    dependent leave directions u in sample space with F^T u = 0. Along u the model is y.u = noise only, and when a
    target has y.u = 0 there (the copies agree) the evidence grows like log(beta) without bound: the fitted score is
    then wherever the solver stops, and a model whose tokenizer maps many texts to one vector wins. Dropping those
    directions is LogME on the data merged over coinciding rows (each group counted once, its mean target weighted
    by its size), so N becomes the number of directions kept. Float32 features of the same text can differ by
    round-off, hence a relative tolerance rather than exact zeros."""
    top = float(s.max()) if s.size else 0.0
    return s > top * NULL_DIRECTION_TOL if top > 0 else np.zeros(s.shape, dtype=bool)


def evidence(sp: Spectrum, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact log-evidence (not divided by N) at beta = N/E(lam), alpha = lam beta, plus alpha, beta."""
    n, d = sp.n, sp.d
    shifted = lam[:, None] + sp.s[None, :]  # (T, k)
    inv = np.reciprocal(shifted)
    pinv = sp.p2 * inv
    if sp.mode == "gram_d":
        e = sp.yy - pinv.sum(axis=1)
        m2 = np.einsum("ij,ij->i", pinv, inv)
    else:
        e = lam * pinv.sum(axis=1)
        m2 = np.einsum("ij,ij,j->i", pinv, inv, sp.s)
    e = np.maximum(e, 1e-300)
    beta = n / e
    alpha = lam * beta
    r = np.maximum(e - lam * m2, 0.0)  # ||F m - y||^2
    k = sp.s.shape[0]
    # sum_{i=1..D} log(alpha + beta s_i) = D log beta + sum_k log(lam + s_i) + (D - k) log lam
    logdet = d * np.log(beta) + np.log(shifted, out=shifted).sum(axis=1) + (d - k) * np.log(lam)
    ev = (
        0.5 * d * np.log(alpha)
        + 0.5 * n * np.log(beta)
        - 0.5 * logdet
        - 0.5 * beta * r
        - 0.5 * alpha * m2
        - 0.5 * n * _LOG_2PI
    )
    return ev, alpha, beta


def posterior_means(f: np.ndarray, sp: Spectrum, basis: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """The posterior means m (T, D) at lam = alpha / beta, one row per target."""
    inv = 1.0 / (lam[None, :] + sp.s[:, None])  # (k, T)
    if sp.mode == "gram_d":
        return (basis @ (sp.proj * inv)).T  # m = V diag(1/(lam+s)) V^T F^T y
    return (f.T @ (basis @ (sp.proj * inv))).T  # m = F^T (F F^T + lam)^-1 y


def fit_result(sp: Spectrum, lam: np.ndarray, iters: int, converged: bool, weights: np.ndarray) -> LogMEResult:
    """The LogMEResult of the fit that reached lam (per target): evidence, alpha and beta there."""
    ev, alpha, beta = evidence(sp, lam)
    per = ev / sp.n
    return LogMEResult(
        score=float(per.mean()),
        weights=weights,
        evidence_per_target=per,
        alpha=alpha,
        beta=beta,
        iterations=int(iters),
        converged=bool(converged),
    )


def _with_bias(features: Any, backend: str) -> Any:
    """F with a column of ones appended (a torch tensor on its device for the torch backend)."""
    if backend == "torch":
        import torch

        ft = torch.as_tensor(features)
        return torch.cat([ft, torch.ones(ft.shape[0], 1, dtype=ft.dtype, device=ft.device)], 1)
    f0 = np.asarray(features, dtype=np.float64)
    return np.hstack([f0, np.ones((f0.shape[0], 1))])


def _targets(labels: Any, task: str, num_classes: int | None, backend: str) -> tuple[np.ndarray | None, int, Any]:
    """(class codes or None, classes, targets): dense (N, T); for many classes a sparse one-hot Y^T (C, N); for the
    torch backend a placeholder of the one-hot shape (the targets are built on the device from the codes)."""
    if task != "classification":
        return None, 0, make_targets(labels, task, num_classes)
    codes, c = class_codes(labels, num_classes)
    if backend == "torch":
        return codes, c, np.broadcast_to(np.zeros((1, 1)), (codes.shape[0], c))  # only its shape is read
    if c >= SPARSE_ONE_HOT_CLASSES:
        return codes, c, one_hot_transposed(codes, c)  # (C, N)
    return codes, c, make_targets(codes, task, c)


def logme(
    features: Any,
    labels: Any,
    task: str = "classification",
    *,
    num_classes: int | None = None,
    backend: Literal["numpy", "torch"] = "numpy",
    device: Any = None,
    solver: Literal["newton", "mackay"] = "newton",
    tol: float = SOLVER_TOL,
    max_iter: int = 1000,
    compute_weights: bool = True,
    add_bias: bool = False,
) -> LogMEResult:
    """Exact LogME of `features` (N, D) for `labels` (see module docstring for label shapes).

    backend="torch" forms the Gram matrix, the eigendecomposition, the projections and the weights
    with torch in float64 on `device` (default: cuda when available); the O(k T) scalar solve runs on
    the CPU. tol is the convergence tolerance on log(alpha/beta) (relative tolerance on alpha/beta).
    add_bias appends a column of ones to F (the reference adds none; centred features cannot fit a
    target's mean without it, which matters when comparing against `prior_only_evidence`).
    When D >= N the features can interpolate a target and the optimum may sit at beta -> inf
    (alpha/beta -> 0); the evidence converges there and the returned beta is just very large.
    """
    if add_bias:
        features = _with_bias(features, backend)
    codes, c, y = _targets(labels, task, num_classes, backend)
    if backend == "torch":
        from workers.ranking.logme_torch import spectrum_torch, weights_torch

        parts, ctx = spectrum_torch(features, y, device, codes, keep=kept_sample_directions)
        sp = Spectrum(*parts)
    elif backend == "numpy":
        f = np.asarray(features, dtype=np.float64)
        rows = y.shape[0] if isinstance(y, np.ndarray) else y.shape[1]
        if f.ndim != 2 or f.shape[0] != rows:
            raise ValueError(f"features {f.shape} do not match {rows} labels")
        # one-hot targets: ||y_c||^2 is the class count, no pass over the N x C matrix needed
        yy = y.sum(axis=0) if task == "multilabel" else None
        if codes is not None:
            yy = np.bincount(codes, minlength=c).astype(np.float64)
        sp, basis = spectrum(f, y, yy)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    empty = sp.yy <= 0
    if empty.any():
        bad = np.flatnonzero(empty).tolist()
        raise ValueError(f"targets {bad} are all zero (a class with no examples?); LogME is undefined")
    lam, iters, converged = solve(sp, solver, tol, max_iter)
    weights = np.empty((0, sp.d))
    if compute_weights:
        weights = weights_torch(ctx, sp.mode, lam) if backend == "torch" else posterior_means(f, sp, basis, lam)
    return fit_result(sp, lam, iters, converged, weights)

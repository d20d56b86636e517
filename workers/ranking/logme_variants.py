"""LogME's variants, each built on the method in logme.py (its spectrum, solver and evidence):

    prior_only_evidence  the baseline of features that say nothing beyond the class prior / target mean
    logme_weighted       the data set with row i repeated counts[i] times (a bootstrap resample), not materialised
    logme_influence      each row's first-order influence on the maximised evidence
    logme_loo_terms      each row's leave-one-out log predictive density at the optimum
    logme_projected      LogME with an intercept on the k leading principal directions, k by maximum evidence
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.ranking.logme import LogMEResult, Spectrum, fit_result, logme, posterior_means, spectrum
from workers.ranking.logme_solvers import SOLVER_TOL, solve
from workers.ranking.targets import make_targets


def prior_only_evidence(labels: Any, task: str = "classification", *, num_classes: int | None = None) -> float:
    """LogME of the 'features say nothing beyond the class prior / target mean' baseline.

    Uses F = a column of ones (a single bias feature), averaged over targets like `logme`, so a model
    whose score does not exceed this value has shown no evidence of useful features.
    """
    n = np.asarray(labels).shape[0]
    return logme(np.ones((n, 1)), labels, task, num_classes=num_classes, compute_weights=False).score


def logme_weighted(
    features: np.ndarray,
    labels: Any,
    counts: np.ndarray,
    task: str = "classification",
    *,
    num_classes: int | None = None,
    tol: float = SOLVER_TOL,
    max_iter: int = 1000,
) -> LogMEResult:
    """LogME of the data set in which row i appears counts[i] times (a bootstrap resample), without
    materialising it: F_b^T F_b = F^T diag(c) F, F_b^T Y_b = F^T diag(c) Y, ||y_b||^2 = sum c y^2, N_b = sum c.
    Only rows with c > 0 enter the Gram matrix (about 63% of them for a bootstrap resample).
    Exact for non-negative integer counts (real weights give the weighted-likelihood evidence, used to
    check influence values numerically); posterior means are not computed (weights array is empty).
    Note a resample with fewer distinct rows than rank-deficient directions allow can be exactly
    interpolable, and then its evidence is unbounded (check `converged`/`score`): the bootstrap of
    LogME is only meaningful when the number of distinct rows comfortably exceeds D.
    The score is divided by N_b = sum(counts)."""
    f = np.asarray(features, dtype=np.float64)
    y = make_targets(labels, task, num_classes)
    c = np.asarray(counts, dtype=np.float64)
    if c.shape != (f.shape[0],) or np.any(c < 0):
        raise ValueError("counts must be non-negative, one per row")
    nz = np.flatnonzero(c > 0)
    n_b = float(c.sum())
    d = f.shape[1]
    root = np.sqrt(c[nz])
    fw = f[nz] * root[:, None]
    yw = y[nz] * root[:, None]
    g = fw.T @ fw
    s, v = np.linalg.eigh(g)
    s = np.maximum(s, 0.0)
    proj = v.T @ (fw.T @ yw)
    yy = np.einsum("nt,nt->t", yw, yw)
    if np.any(yy <= 0):
        raise ValueError("a target is all zero in this resample (a class was not drawn)")
    sp = Spectrum(s, proj, yy, "gram_d", n_b, d)
    lam, iters, converged = solve(sp, "newton", tol, max_iter)
    return fit_result(sp, lam, iters, converged, np.empty((0, d)))


def _dense_fit(features: Any, labels: Any, task: str, num_classes: int | None, *,
               compute_weights: bool) -> tuple[np.ndarray, np.ndarray, Spectrum, np.ndarray, np.ndarray, LogMEResult]:
    """LogME on dense targets, keeping what the per-row functions below need: features, targets, spectrum, basis,
    lam and the result (posterior means when compute_weights)."""
    y = make_targets(labels, task, num_classes)
    f = np.asarray(features, dtype=np.float64)
    sp, basis = spectrum(f, y)
    lam, iters, converged = solve(sp, "newton", SOLVER_TOL, 1000)
    weights = posterior_means(f, sp, basis, lam) if compute_weights else np.empty((0, sp.d))
    return f, y, sp, basis, lam, fit_result(sp, lam, iters, converged, weights)


def logme_influence(features: Any, labels: Any, task: str = "classification", *,
                    num_classes: int | None = None) -> tuple[float, np.ndarray]:
    """Score and per-row influence psi_i (N,) of the (un-normalised) maximised evidence.

    Adding weight eps to row i changes the maximised log-evidence by eps * psi_i + O(eps^2); by the
    envelope theorem (alpha, beta and m are optimal) psi_i = mean over targets of
        1/2 log(beta / 2 pi) - beta/2 (y_i - f_i^T m)^2 - beta/2 f_i^T (alpha I + beta F^T F)^-1 f_i.
    So a bootstrap resample with counts c has score ~= score + sum_i (c_i - 1) psi_i / N: the
    first-order (delta-method) bootstrap, which needs no refit and stays finite where an exact refit
    of a resample with duplicated rows and D >= distinct rows is unbounded.
    Cost about one more LogME (the rows in the eigenbasis, N x D x D).
    """
    f, y, sp, basis, lam, res = _dense_fit(features, labels, task, num_classes, compute_weights=True)
    n = sp.n  # rows, or the sample directions kept when N < D
    inv = 1.0 / (sp.s[:, None] + lam[None, :])  # (k, T): 1/(s_j + lam)
    if sp.mode == "gram_d":
        # beta f_i^T A^-1 f_i = sum_j (f_i^T v_j)^2 / (lam + s_j)
        beta_lev = ((f @ basis) ** 2) @ inv
        r = y - f @ res.weights.T
        beta_r2 = res.beta[None, :] * r * r
    else:
        # N < D: with (U, s) from F F^T, beta f_i^T A^-1 f_i = [F F^T (F F^T + lam)^-1]_ii and the residual is
        # r = lam U diag(1/(s+lam)) U^T y. Written without beta: where the features interpolate a target
        # (lam -> 0, beta -> 1e30) y - F m cancels to round-off and beta r^2 came out as 1e29 noise.
        beta_lev = (basis**2) @ (sp.s[:, None] * inv)
        scaled = basis @ (sp.proj * inv)  # r / lam
        beta_r2 = n * lam[None, :] * scaled**2 / np.einsum("jt,jt->t", sp.proj**2, inv)[None, :]
    psi = 0.5 * np.log(res.beta / (2 * np.pi))[None, :] - 0.5 * (beta_r2 + beta_lev)
    return res.score, psi.mean(axis=1)


def logme_loo_terms(features: Any, labels: Any, task: str = "classification", *,
                    num_classes: int | None = None) -> tuple[float, np.ndarray]:
    """Score and each row's leave-one-out log predictive density (N,), averaged over targets, at LogME's optimum.

    At the fitted alpha, beta the model is a Gaussian process y ~ N(0, C) with C = F F^T / alpha + I / beta, whose
    leave-one-out predictive for row i is N(y_i - [C^-1 y]_i / [C^-1]_ii, 1 / [C^-1]_ii) in closed form. With the
    eigen-data LogME already has ([C^-1]_ii = beta h_i and [C^-1 y]_i = beta g_i below) it costs O(N k T) more.
    Unlike the influence psi_i these terms stay informative when N <= D: every row is then fitted almost exactly
    (psi_i is about the same for all rows), but how well the others predict it still varies from row to row.
    The constant part (log beta) is kept, so terms of one model sum to its LOO log-likelihood; a bootstrap that
    re-weights rows by counts summing to N sees only their spread."""
    f, y, sp, basis, lam, res = _dense_fit(features, labels, task, num_classes, compute_weights=False)
    shrink = lam[None, :] / (lam[None, :] + sp.s[:, None])  # (k, T): lam / (lam + s_j)
    if sp.mode == "gram_n":
        # C^-1 = beta [U diag(lam/(lam+s)) U^T + (I - U U^T)]. The second term lives on the null directions dropped
        # as coinciding rows (see kept_sample_directions), so it is added only when some were: otherwise
        # 1 - sum U^2 is round-off (1e-16) that would swamp h ~ lam at a near-interpolating optimum.
        u2 = basis * basis
        h = u2 @ shrink
        g = basis @ (shrink * sp.proj)
        if sp.n < f.shape[0]:
            h += np.maximum(1.0 - u2.sum(axis=1), 0.0)[:, None]
            g += y - basis @ sp.proj
    else:
        # N > D: [C^-1]_ii / beta = 1 - f_i^T (F^T F + lam)^-1 f_i, [C^-1 y]_i / beta = y_i - f_i^T m (ridge LOO)
        rows = f @ basis  # (N, D): rows in the eigenbasis
        inv = 1.0 / (lam[None, :] + sp.s[:, None])
        h = 1.0 - (rows * rows) @ inv
        g = y - rows @ (sp.proj * inv)
    h = np.maximum(h, 1e-300)
    terms = 0.5 * (np.log(res.beta / (2 * np.pi))[None, :] + np.log(h) - res.beta[None, :] * g * g / h)
    return res.score, terms.mean(axis=1)


@dataclass
class ProjectedLogMEResult:
    score: float  # LogME score at the chosen dimension
    k: int  # chosen number of leading components
    scores_by_k: dict[int, float]  # evidence / N for every k tried (the full width included)
    result: LogMEResult  # full result at k (weights are in the k-dim projected coordinates)
    components: np.ndarray  # (D', k) projection: the k leading eigenvectors of F'^T F' (F' = [F, c] with intercept)
    intercept: bool = True  # whether a constant column was appended to F before projecting
    intercept_value: float = 1.0  # c: the root-mean-square row norm of the F it was fitted on

    def project(self, features: Any) -> np.ndarray:
        """Features (N, D) in the chosen k coordinates (the constant column appended first when intercept)."""
        f = np.asarray(features, dtype=np.float64)
        if self.intercept:
            f = np.hstack([f, np.full((f.shape[0], 1), self.intercept_value)])
        return f @ self.components


def _default_dims(rank_dim: int) -> list[int]:
    dims, k = [], 8
    while k < rank_dim:
        dims.append(k)
        k *= 2
    return dims + [rank_dim]


def _leading_directions(f: np.ndarray, sp: Spectrum, basis: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The spectrum leading-first in D-space coordinates: eigenvalues sigma_j, b_j = v_j^T F^T y (one column per
    target) and the directions v_j (D, k) of F^T F."""
    order = np.argsort(sp.s)[::-1]
    s_sorted = sp.s[order]
    if sp.mode == "gram_d":
        return s_sorted, sp.proj[order], basis[:, order]
    x = sp.proj[order]
    b = np.sqrt(s_sorted)[:, None] * x
    u_sorted = basis[:, order]
    # right singular vectors v_j = F^T u_j / sqrt(s_j) (only for s_j > 0)
    pos = s_sorted > s_sorted[0] * 1e-12
    v_sorted = np.zeros((f.shape[1], len(order)))
    v_sorted[:, pos] = (f.T @ u_sorted[:, pos]) / np.sqrt(s_sorted[pos])
    return s_sorted, b, v_sorted


def logme_projected(
    features: Any,
    labels: Any,
    task: str = "classification",
    dims: list[int] | None = None,
    *,
    num_classes: int | None = None,
    intercept: bool = True,
) -> ProjectedLogMEResult:
    """LogME with an intercept on the k leading principal directions of F, with k chosen by maximum evidence.

    LogME's Occam factor charges every feature dimension: with few examples and wide features a
    real but low-dimensional signal can score below the label-prior baseline. Projecting on the
    top-k eigenvectors of F'^T F' (k from 8, 16, 32, ..., plus the full width) and keeping the k with the
    largest evidence keeps LogME's meaning (it is Bayesian model selection over nested linear models) and
    never scores below LogME of F' because the full width is among the candidates. Selecting among
    ~log2(D) models adds at most log(#dims)/N of optimism. All k share one eigendecomposition: each extra
    k costs O(k T).

    intercept (default): F' = [F, 1]. Published LogME fits no bias, so a target's mean (for one-hot
    targets, the class prior) must be represented by the features: a model whose features are nearly one
    constant vector (a randomly initialised one: ||mean f|| / mean ||f|| = 0.95-0.99 against 0.4-0.75 for
    pretrained encoders) fits the prior for the cost of one direction, while centred or weakly
    offset features pay for it across many, and the difference can exceed the real signal. With the
    ones column every model can fit the prior alike (measured on real data in benchmarks/occam*.py).
    intercept=False: F' = F, uncentred, LogME's own bias-free model.
    The constant column holds c = the root-mean-square norm of a feature row, not 1: every column shares one prior
    precision, so the intercept's prior variance is c²/α, and with c² = mean ||f_i||² it equals the prior variance
    of the whole feature term f·w, for every model alike. A column of ones instead made the intercept's cost depend
    on the units a model outputs in (nearly free beside MPNet's features of size 0.1, dear beside SmolLM2's of 1.3,
    all that counted beside a random MobileNetV2's of 1e-9); with c the score is invariant to scaling F, as
    LogME's own is.
    """
    y = make_targets(labels, task, num_classes)
    f = np.asarray(features, dtype=np.float64)
    intercept_value = 1.0
    if intercept:
        row_norm = float(np.sqrt(np.mean(np.einsum("nd,nd->n", f, f)))) if f.size else 0.0
        intercept_value = row_norm if np.isfinite(row_norm) and row_norm > 0 else 1.0
        f = np.hstack([f, np.full((f.shape[0], 1), intercept_value)])
    d = f.shape[1]
    sp, basis = spectrum(f, y)
    s_sorted, b, v_sorted = _leading_directions(f, sp, basis)
    rank_dim = min(sp.n, d)  # sp.n: directions kept when N < D (see kept_sample_directions)
    cand = sorted({int(k) for k in (dims if dims is not None else _default_dims(rank_dim)) if 1 <= k <= rank_dim})
    scores: dict[int, float] = {}
    best = None
    for k in cand:
        sub = Spectrum(s_sorted[:k], b[:k], sp.yy, "gram_d", sp.n, k)
        lam, iters, conv = solve(sub, "newton", SOLVER_TOL, 1000)
        res = fit_result(sub, lam, iters, conv, np.empty((0, k)))
        scores[k] = res.score
        if best is None or res.score > best[1].score:
            best = (k, res, lam, sub)
    # the full width (D may exceed rank: zero eigenvalues count) is always a candidate
    if dims is None and d > rank_dim:
        full = logme(f, labels, task, num_classes=num_classes, compute_weights=False)
        scores[d] = full.score
        if full.score > best[1].score:
            best = (d, full, None, None)
    k, res, lam, sub = best
    if lam is not None:
        inv = 1.0 / (lam[None, :] + sub.s[:, None])
        res.weights = (sub.proj * inv).T  # posterior means in the k projected coordinates
        comps = v_sorted[:, :k]
    else:
        comps = np.eye(d)
    return ProjectedLogMEResult(score=res.score, k=k, scores_by_k=scores, result=res, components=comps,
                                intercept=intercept, intercept_value=intercept_value)

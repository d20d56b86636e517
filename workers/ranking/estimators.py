"""Transferability estimators beside LogME, as pure functions over numpy arrays.

Feature-based, `(features (N, D), labels (N,) ints 0..C-1) -> float`, higher = more transferable:
    hscore, hscore_shrinkage, nleep, gbc, transrate, sfda
Source-head based, `(source_probs (N, Z) rows summing to 1, labels) -> float`:
    leep, nce
Formulas and reference implementations (read, not copied): TLlib tllib/ranking/{hscore,leep,nce,
transrate}.py; google-research stable_transfer/transferability/{gbc,nleep}.py; TencentARC/SFDA
metrics.py. Deviations from those references are stated in each docstring.

`ESTIMATORS` is the registry the pipeline uses; `score_estimator` returns None where an estimator does
not apply (wrong task, no source head, too few classes), never a made-up number. (workers/tuning/evaluation.py is
another thing: the accuracy and F1 of a tuned model.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
from scipy.special import logsumexp, softmax

from service.contract import ESTIMATORS as CONTRACT_ESTIMATORS

# ---------------------------------------------------------------- helpers

def _labels(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Map labels to 0..C-1 (only classes present), return (codes, C)."""
    y = np.asarray(labels).reshape(-1)
    _, codes = np.unique(y, return_inverse=True)
    return codes, int(codes.max()) + 1 if codes.size else 0


def _class_means(f: np.ndarray, y: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.bincount(y, minlength=c).astype(np.float64)
    sums = np.zeros((c, f.shape[1]))
    np.add.at(sums, y, f)
    return sums / counts[:, None], counts


def _psd_pinv(a: np.ndarray, rcond: float = 1e-15) -> np.ndarray:
    """Pseudo-inverse of a symmetric PSD matrix (cutoff rcond * largest eigenvalue, as np.linalg.pinv)."""
    w, v = np.linalg.eigh(a)
    keep = w > rcond * max(w.max(), 0.0)
    return (v[:, keep] / w[keep]) @ v[:, keep].T


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf shrunk covariance of already-centred x (N, D): ((1-a) S + a mu I, a), S = x^T x / N.

    Same estimator as sklearn.covariance.LedoitWolf (Ledoit & Wolf 2004, the 'well-conditioned
    estimator' with the sample-based optimal shrinkage).
    """
    n, d = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / d
    x2 = x * x
    # beta: estimated variance of the entries of S; delta: distance of S from mu I
    beta_ = np.sum(x2.T @ x2) / n - np.sum(s * s)
    beta = beta_ / (d * n)
    delta = (np.sum(s * s) - 2 * mu * np.trace(s) + d * mu * mu) / d
    beta = min(beta, delta)
    a = 0.0 if beta == 0 else beta / delta
    shrunk = (1.0 - a) * s
    shrunk.flat[:: d + 1] += a * mu
    return shrunk, float(a)


# ---------------------------------------------------------------- source-head estimators

def leep(source_probs: np.ndarray, labels: np.ndarray) -> float:
    """LEEP (Nguyen et al. 2020): mean_i log sum_z P^(y_i | z) theta_z(x_i), with the empirical joint
    P^(y, z) = (1/N) sum_{i: y_i = y} theta_z(x_i) and P^(y|z) = P^(y,z) / P^(z)."""
    p = np.asarray(source_probs, dtype=np.float64)
    y, c = _labels(labels)
    n = p.shape[0]
    joint = np.zeros((c, p.shape[1]))
    np.add.at(joint, y, p / n)
    pz = joint.sum(axis=0)
    cond = np.divide(joint, pz, out=np.zeros_like(joint), where=pz > 0)  # P(y|z); unused z -> 0
    eep = np.einsum("nz,nz->n", p, cond[y])
    return float(np.mean(np.log(eep)))


def nce(source_probs: np.ndarray, labels: np.ndarray) -> float:
    """NCE (Tran et al. 2019): -H(Y | Z) with Z = argmax of the source head, from empirical counts."""
    z = np.argmax(np.asarray(source_probs), axis=1)
    y, c = _labels(labels)
    n = y.size
    joint = np.zeros((c, int(z.max()) + 1))
    np.add.at(joint, (y, z), 1.0 / n)
    pz = joint.sum(axis=0)
    nz = joint > 0
    cond = np.divide(joint, pz, out=np.ones_like(joint), where=nz)
    return float(np.sum(joint[nz] * np.log(cond[nz])))  # = -H(Y|Z)


# ---------------------------------------------------------------- feature-based estimators

def hscore(features: np.ndarray, labels: np.ndarray) -> float:
    """H-score (Bao et al. 2019): tr(cov(f)^+ cov(E[f|y])), covariances with ddof=1 as in TLlib."""
    f = np.asarray(features, dtype=np.float64)
    y, c = _labels(labels)
    n = f.shape[0]
    fc = f - f.mean(axis=0)
    covf = fc.T @ fc / (n - 1)
    means, counts = _class_means(fc, y, c)
    # cov(g) with g_i = E[f | y_i]: sum_c n_c (mu_c - mu)(mu_c - mu)^T / (N - 1); fc is centred
    return float(np.einsum("cd,de,ce,c->", means, _psd_pinv(covf), means, counts) / (n - 1))


def hscore_shrinkage(features: np.ndarray, labels: np.ndarray) -> float:
    """Shrinkage H-score (Ibrahim et al. 2022): tr(cov_LW(f)^+ (1 - a) cov(E[f|y])) with the
    Ledoit-Wolf covariance cov_LW and its shrinkage a; cov(E[f|y]) with ddof=1 as in TLlib."""
    f = np.asarray(features, dtype=np.float64)
    y, c = _labels(labels)
    n = f.shape[0]
    fc = f - f.mean(axis=0)
    cov_lw, a = ledoit_wolf(fc)
    means, counts = _class_means(fc, y, c)
    return float((1 - a) * np.einsum("cd,de,ce,c->", means, _psd_pinv(cov_lw), means, counts) / (n - 1))


def _coding_rate(z: np.ndarray, eps: float) -> float:
    """R(Z) = 1/2 logdet(I + Z^T Z / (n eps)), via the smaller Gram matrix (same determinant)."""
    n, d = z.shape
    g = z.T @ z if d <= n else z @ z.T
    _, logdet = np.linalg.slogdet(np.eye(g.shape[0]) + g / (n * eps))
    return 0.5 * float(logdet)


def transrate(features: np.ndarray, labels: np.ndarray, eps: float = 1e-4) -> float:
    """TransRate (Huang et al. 2022): R(Z) - mean_c R(Z_c) on globally centred features, as TLlib."""
    f = np.asarray(features, dtype=np.float64)
    y, c = _labels(labels)
    z = f - f.mean(axis=0)
    return _coding_rate(z, eps) - float(np.mean([_coding_rate(z[y == k], eps) for k in range(c)]))


def gbc(features: np.ndarray, labels: np.ndarray, gaussian_type: str = "spherical") -> float:
    """GBC (Pandy et al. 2022): -sum_{c != c'} exp(-D_B(c, c')) over per-class Gaussians with diagonal
    or spherical covariance (variances floored at 1e-4 as in stable_transfer).

    D_B is the exact Bhattacharyya distance: 1/8 sum_d (mu1-mu2)^2/s + 1/2 sum_d [log s - (log s1 +
    log s2)/2] with s = (s1+s2)/2. For spherical Gaussians stable_transfer adds the log term once
    instead of once per dimension; here it is the true distance (D times that term).
    """
    f = np.asarray(features, dtype=np.float64)
    y, c = _labels(labels)
    d = f.shape[1]
    means, counts = _class_means(f, y, c)
    var = np.zeros((c, d))
    np.add.at(var, y, (f - means[y]) ** 2)
    var = np.maximum(var / counts[:, None], 1e-4)  # population variance
    if gaussian_type == "spherical":
        var = np.repeat(var.mean(axis=1, keepdims=True), d, axis=1)
    elif gaussian_type != "diagonal":
        raise ValueError("gaussian_type must be 'spherical' or 'diagonal'")
    total = 0.0
    logv = np.log(var)
    for i in range(c):
        s = (var[i] + var) / 2  # (C, D)
        db = np.sum((means[i] - means) ** 2 / s, axis=1) / 8 + 0.5 * np.sum(
            np.log(s) - 0.5 * (logv[i] + logv), axis=1)
        db[i] = np.inf  # exclude c == c'
        total += np.sum(np.exp(-db))
    return float(-total)


def _shrunk(cov: np.ndarray, a: float) -> np.ndarray:
    d = cov.shape[0]
    out = (1.0 - a) * cov
    out.flat[:: d + 1] += a * np.trace(cov) / d
    return out


def _sfda_proba(f: np.ndarray, y: np.ndarray, c: int, shrinkage: float | None):
    """Regularised Fisher discriminant of SFDA's first/second stage: returns p(y|x) and shrinkage."""
    n, d = f.shape
    priors = np.bincount(y, minlength=c) / n
    means, counts = _class_means(f, y, c)
    sw = np.zeros((d, d))
    for k in range(c):
        xk = f[y == k] - means[k]
        sw += priors[k] * (xk.T @ xk) / counts[k]  # prior-weighted within-class covariance (bias=1)
    if shrinkage is None:
        # adaptive strength exp(-5 * largest eigenvalue of Sw) (the reference estimates that
        # eigenvalue by 3 power iterations; this uses the exact one)
        top = sla.eigh(sw, eigvals_only=True, subset_by_index=[d - 1, d - 1])[0]
        shrinkage = max(float(np.exp(-5.0 * top)), 1e-10)
    sw_s = _shrunk(sw, shrinkage)
    # The reference projects on all generalised eigenvectors W of (Sb, Sw_s) and uses
    # coef = means W W^T; with every eigenvector kept W W^T = Sw_s^-1, i.e. shrunk LDA.
    coef = sla.solve(sw_s, means.T, assume_a="pos").T  # (C, D)
    intercept = -0.5 * np.sum(means * coef, axis=1) + np.log(priors)
    return softmax(f @ coef.T + intercept, axis=1), shrinkage


def sfda(features: np.ndarray, labels: np.ndarray) -> float:
    """SFDA (Shao et al. ECCV 2022): regularised Fisher discriminant, ConfMix of each sample toward
    the mean of the other classes' means by its (softened) confidence, second discriminant with the
    same shrinkage; score = mean p(y_i | x_i) (no log, as the reference)."""
    f = np.array(features, dtype=np.float64)  # copy: ConfMix rewrites rows
    y, c = _labels(labels)
    if c < 2:
        raise ValueError("SFDA needs at least 2 classes")
    prob, shrink = _sfda_proba(f, y, c, None)
    prob = softmax(prob, axis=1)  # the reference softens the probabilities with a second softmax
    means, _ = _class_means(f, y, c)
    others = (means.sum(axis=0) - means) / (c - 1)  # mean of the other classes' means
    p_true = prob[np.arange(f.shape[0]), y][:, None]
    f = p_true * f + (1 - p_true) * others[y]
    prob2, _ = _sfda_proba(f, y, c, shrink)
    return float(np.mean(prob2[np.arange(f.shape[0]), y]))


# ---------------------------------------------------------------- NLEEP: PCA + GMM + LEEP

def pca_energy(features: np.ndarray, energy: float = 0.8) -> np.ndarray:
    """Centred PCA keeping the fewest components whose explained variance reaches `energy`."""
    f = np.asarray(features, dtype=np.float64)
    fc = f - f.mean(axis=0)
    u, s, vt = np.linalg.svd(fc, full_matrices=False)
    ratio = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.searchsorted(ratio, energy) + 1)
    return u[:, :k] * s[:k]


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centers = [x[rng.integers(x.shape[0])]]
    d2 = np.sum((x - centers[0]) ** 2, axis=1)
    for _ in range(1, k):
        total = d2.sum()
        idx = rng.integers(x.shape[0]) if total <= 0 else rng.choice(x.shape[0], p=d2 / total)
        centers.append(x[idx])
        d2 = np.minimum(d2, np.sum((x - x[idx]) ** 2, axis=1))
    return np.array(centers)


def gmm_posteriors(x: np.ndarray, k: int, *, covariance: str = "full", seed: int = 0,
                   max_iter: int = 100, tol: float = 1e-3, reg: float = 1e-6) -> np.ndarray:
    """Posterior responsibilities (N, k) of a k-component Gaussian mixture fitted by EM.

    Mirrors sklearn GaussianMixture's defaults (k-means-style init, reg_covar 1e-6 on the diagonal,
    stop when the mean log-likelihood improves by < tol, 100 iterations); k-means++ seeding with a
    fixed seed keeps it deterministic. covariance: "full" or "diag".
    """
    n, d = x.shape
    rng = np.random.default_rng(seed)
    k = min(k, n)
    centers = _kmeans_pp(x, k, rng)
    for _ in range(10):  # a few Lloyd steps, like sklearn's kmeans init
        assign = np.argmin(((x[:, None, :] - centers[None]) ** 2).sum(-1), axis=1)
        for j in range(k):
            if np.any(assign == j):
                centers[j] = x[assign == j].mean(axis=0)
    resp = np.zeros((n, k))
    resp[np.arange(n), assign] = 1.0
    prev = -np.inf
    for _ in range(max_iter):
        # M step
        nk = resp.sum(axis=0) + 10 * np.finfo(float).eps
        w = nk / n
        mu = resp.T @ x / nk[:, None]
        logp = np.empty((n, k))
        for j in range(k):
            xc = x - mu[j]
            if covariance == "full":
                cov = (resp[:, j, None] * xc).T @ xc / nk[j]
                cov.flat[:: d + 1] += reg
                chol = np.linalg.cholesky(cov)
                sol = sla.solve_triangular(chol, xc.T, lower=True)
                logdet = 2 * np.sum(np.log(np.diag(chol)))
                maha = np.sum(sol * sol, axis=0)
            else:
                var = resp[:, j] @ (xc * xc) / nk[j] + reg
                logdet = np.sum(np.log(var))
                maha = (xc * xc) @ (1.0 / var)
            logp[:, j] = np.log(w[j]) - 0.5 * (d * np.log(2 * np.pi) + logdet + maha)
        # E step
        norm = logsumexp(logp, axis=1)
        resp = np.exp(logp - norm[:, None])
        ll = float(norm.mean())
        if abs(ll - prev) < tol:
            break
        prev = ll
    return resp


def nleep(features: np.ndarray, labels: np.ndarray, *, components_per_class: int = 5,
          energy: float = 0.8, covariance: str = "full", seed: int = 0) -> float:
    """NLEEP (Li et al. CVPR 2021): LEEP with the source head replaced by the posteriors of a
    Gaussian mixture (5 components per class) fitted on PCA features keeping 80% of the variance."""
    y, c = _labels(labels)
    z = pca_energy(features, energy)
    post = gmm_posteriors(z, components_per_class * c, covariance=covariance, seed=seed)
    return leep(post, y)


# ---------------------------------------------------------------- registry

@dataclass(frozen=True)
class Estimator:
    """An estimator of the contract (service.contract.ESTIMATORS: its name and tasks) with its function."""

    name: str
    tasks: frozenset[str]
    needs_source_head: bool
    fn: Callable[..., float]
    higher_is_better: bool = True

    def applies_to(self, task: str) -> bool:
        """Whether the estimator is defined for this task."""
        return task in self.tasks

    @property
    def task_aware(self) -> bool:
        """Takes the task as its third argument (the estimators defined beyond classification)."""
        return self.tasks != {"classification"}


def _logme_score(features: np.ndarray, labels: np.ndarray, task: str) -> float:
    from workers.ranking.logme import logme

    return logme(features, labels, task, compute_weights=False).score


def _logme_projected_score(features: np.ndarray, labels: np.ndarray, task: str) -> float:
    from workers.ranking.logme_variants import logme_projected

    return logme_projected(features, labels, task).score


def _ridge_loo_score(features: np.ndarray, labels: np.ndarray, task: str) -> float:
    from workers.ranking.probe import ridge_loo

    return ridge_loo(features, labels, task)


_FUNCTIONS: dict[str, Callable[..., float]] = {
    "logme": _logme_score, "logme_projected": _logme_projected_score, "ridge_loo": _ridge_loo_score,
    "hscore": hscore, "hscore_shrinkage": hscore_shrinkage, "nleep": nleep, "gbc": gbc, "transrate": transrate,
    "sfda": sfda, "leep": leep, "nce": nce,
}
# One entry per estimator of the contract; a name without a function fails here, at import.
ESTIMATORS: dict[str, Estimator] = {name: Estimator(name, info.tasks, info.needs_source_head, _FUNCTIONS[name])
                                    for name, info in CONTRACT_ESTIMATORS.items()}


# Estimators with an absolute constant (NLEEP's covariance regulariser 1e-6, GBC's variance floor 1e-4, TransRate's
# eps 1e-4, SFDA's exp(-5·eigenvalue) shrinkage) whose scores change with the units a model outputs in: a randomly
# initialised MobileNetV2 returns features of size 1e-22, some decoders 1e3. score_estimator hands them features
# divided by their root-mean-square entry; the published functions stay as published. LogME, its projected form
# (see logme_projected), ridge_loo and the H-scores are invariant to the scale already.
SCALE_DEPENDENT = frozenset({"nleep", "gbc", "transrate", "sfda"})


def unit_rms(features: np.ndarray) -> np.ndarray:
    """Features divided by their root-mean-square entry (unchanged when that is 0 or not finite)."""
    f = np.asarray(features, dtype=np.float64)
    rms = float(np.sqrt(np.mean(f * f))) if f.size else 0.0
    return f / rms if np.isfinite(rms) and rms > 0 else f


def score_estimator(name: str, features: np.ndarray | None, labels: np.ndarray, task: str,
                    source_probs: np.ndarray | None = None) -> float | None:
    """Score one estimator, or None when it does not apply (task, missing source head, < 2 classes)."""
    estimator = ESTIMATORS.get(name)
    if estimator is None:
        raise KeyError(f"unknown metric {name!r}; known: {sorted(ESTIMATORS)}")
    if not estimator.applies_to(task):
        return None
    if estimator.task_aware:
        return estimator.fn(features, labels, task)
    if len(np.unique(np.asarray(labels))) < 2:
        return None
    if estimator.needs_source_head:
        if source_probs is None:
            return None
        return estimator.fn(source_probs, labels)
    return estimator.fn(unit_rms(features) if name in SCALE_DEPENDENT else features, labels)


# The old names, for the callers not renamed yet (workers/pipeline.py, workers/halving.py, benchmarks/): remove
# them with the last of those.

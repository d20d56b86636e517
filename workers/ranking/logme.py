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
  (linear convergence, kept for cross-checking).

Targets: classification -> one one-hot column per class; multilabel -> one 0/1 column per label;
regression -> one column per output, used as given (NOT standardised: the evidence is a density of y,
so rescaling a target by c shifts its per-sample score by -log|c|; standardise before calling if you
want scale-free scores across datasets; ranking models on one dataset is unaffected by the scale, but not by
the mean, since no bias is fitted: rank jobs standardise regression targets, see workers.pipeline.ranking_targets).
No bias column is added (as in the reference); append a column of ones to F if you want one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Task = Literal["classification", "multilabel", "regression"]

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


def class_codes(labels: Any, num_classes: int | None = None) -> tuple[np.ndarray, int]:
    """Checked integer class ids (N,) and the number of classes C."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"classification labels must be shape (N,), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.mod(y, 1) == 0):
            raise ValueError("classification labels must be integers 0..C-1")
        y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError("classification labels must be >= 0")
    c = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if y.size and y.max() >= c:
        raise ValueError(f"label {int(y.max())} >= num_classes {c}")
    return y, c


# From this many classes on, F^T Y for one-hot Y is formed as per-class row sums (a sparse product, N*D additions)
# instead of a dense N x D x C matrix product; below it the dense product is as fast.
SPARSE_ONE_HOT_CLASSES = 8


def one_hot_transposed(codes: np.ndarray, num_classes: int) -> Any:
    """Y^T as a (C, N) CSR matrix: Y^T A is the per-class sum of A's rows."""
    import scipy.sparse as sps

    n = codes.shape[0]
    return sps.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(num_classes, n))


def _transpose_times(a: np.ndarray, y: Any) -> np.ndarray:
    """A^T Y for dense targets Y (N, T), or for Y given as a sparse Y^T (T, N)."""
    if isinstance(y, np.ndarray):
        return a.T @ y
    return np.asarray((y @ a).T)


def make_targets(labels: Any, task: str = "classification", num_classes: int | None = None) -> np.ndarray:
    """Turn labels into the (N, T) float64 target matrix LogME fits, one column per target."""
    y = np.asarray(labels)
    if task == "classification":
        y, c = class_codes(y, num_classes)
        out = np.zeros((y.shape[0], c), dtype=np.float64)
        out[np.arange(y.shape[0]), y] = 1.0
        return out
    if task == "multilabel":
        if y.ndim != 2:
            raise ValueError(f"multilabel labels must be shape (N, C), got {y.shape}")
        out = np.asarray(y, dtype=np.float64)
        if not np.all((out == 0) | (out == 1)):
            raise ValueError("multilabel labels must be 0/1")
        return np.ascontiguousarray(out)
    if task == "regression":
        out = np.asarray(y, dtype=np.float64)
        if out.ndim == 1:
            out = out[:, None]
        if out.ndim != 2:
            raise ValueError(f"regression targets must be (N,) or (N, T), got {y.shape}")
        if not np.all(np.isfinite(out)):
            raise ValueError("regression targets contain NaN or inf")
        return np.ascontiguousarray(out)
    raise ValueError(f"unknown task {task!r}")


class _Spectrum:
    """Eigen-data shared by all targets: s (k,), per-target squared projections p2 (T, k), mode."""

    def __init__(self, s, proj, yy, mode, n, d):
        self.s = s
        self.proj = proj  # (k, T): V^T F^T Y (gram_d) or U^T Y (gram_n)
        self.p2 = np.ascontiguousarray((proj * proj).T)  # (T, k)
        self.yy = yy  # (T,) ||y||^2
        self.mode = mode
        self.n = n
        self.d = d


def _stats(s: np.ndarray, p2: np.ndarray, yy: np.ndarray, mode: str, lam: np.ndarray):
    """Per-target sums over the k eigen-directions (rows of p2 are targets):
    gamma = sum s/(lam+s), sum s/(lam+s)^2, E(lam), ||m||^2, sum q/(lam+s)^3 (for the Hessian)."""
    inv = lam[:, None] + s[None, :]  # (T, k)
    np.reciprocal(inv, out=inv)
    inv2 = inv * inv
    gamma = inv @ s
    s_inv2 = inv2 @ s
    if mode == "gram_d":
        # p2 = (V^T F^T y)^2: ||m||^2 = sum p2/(lam+s)^2, E = ||y||^2 - sum p2/(lam+s)
        q = np.multiply(p2, inv2, out=inv2)
        e = yy - np.einsum("ij,ij->i", p2, inv)
    else:
        # p2 = (U^T y)^2: ||m||^2 = sum s p2/(lam+s)^2, E = sum p2 lam/(lam+s) (no cancellation)
        e = lam * np.einsum("ij,ij->i", p2, inv)
        q = np.multiply(p2 * s[None, :], inv2, out=inv2)
    m2 = q.sum(axis=1)
    m3 = np.einsum("ij,ij->i", q, inv)
    e = np.maximum(e, 1e-300)
    return gamma, s_inv2, e, m2, m3


# Offsets (in log lam) of the starting grid around the mean eigenvalue: one unit apart, wide enough that an optimum
# outside is in a tail where the evidence is nearly flat.
_GRID_OFFSETS = np.arange(-16.0, 16.5, 1.0)


def _grid_start(sp: _Spectrum, t_centre: float) -> np.ndarray:
    """A starting log(lam) per target: the best of a grid of profile evidences, refined by the root of phi.

    At beta = N/E(lam) the log evidence is, up to a constant, k/2 log lam - N/2 log E(lam) - 1/2 sum log(lam + s_i),
    so the whole grid for all targets costs one (T, k) x (k, J) product. Around the best grid point the start is
    the root of the quadratic through phi (the log MacKay ratio Newton works on, see _solve) at the three nearest
    grid points: phi is nearly linear in t, so that root lands within ~0.005 of the optimum (a parabola through the
    profile: ~0.05), and Newton then needs two evaluations for most targets instead of three. One more
    (T, k) x (k, J) product (||m||^2 on the grid) pays for it."""
    t_grid = t_centre + _GRID_OFFSETS
    lam = np.exp(t_grid)
    inv = np.reciprocal(sp.s[:, None] + lam[None, :])  # (k, J)
    # (T, J) sums over i of p2/(lam + s_i) and p2/(lam + s_i)^2 (times s_i when gram_n), in one product
    both = np.concatenate([inv, inv * inv * (1.0 if sp.mode == "gram_d" else sp.s[:, None])], axis=1)
    q, m2 = np.split(sp.p2 @ both, 2, axis=1)
    e = np.maximum(sp.yy[:, None] - q if sp.mode == "gram_d" else q * lam[None, :], 1e-300)
    prof = 0.5 * sp.s.shape[0] * t_grid - 0.5 * sp.n * np.log(e) + 0.5 * np.log(inv).sum(0)
    j = np.clip(prof.argmax(axis=1), 1, t_grid.size - 2)
    rows = np.arange(prof.shape[0])
    # phi = log gamma - log(N lam ||m||^2 / E) on the grid, read at the three grid points around the best one
    gamma = sp.s @ inv  # (J,)
    phi_grid = np.log(np.maximum(gamma, 1e-300)) - np.log(np.maximum(sp.n * lam * m2 / e, 1e-300))
    phi = phi_grid[rows, np.stack([j - 1, j, j + 1])]  # (3, T)
    # phi(j + x) ~ c0 + c1 x + c2 x^2; its root next to -c0/c1, in the stable form
    c0 = phi[1]
    c1 = 0.5 * (phi[2] - phi[0])
    c2 = 0.5 * (phi[2] + phi[0]) - phi[1]
    disc = c1 * c1 - 4.0 * c2 * c0
    ok = (c1 < 0) & (disc >= 0) & np.isfinite(phi).all(axis=0)
    root = np.where(ok, 2.0 * c0 / np.where(ok, np.sqrt(np.maximum(disc, 0.0)) - c1, 1.0), 0.0)
    # where phi is not falling through zero near j (a tail, a flat profile) keep the parabola through the profile
    left, mid, right = prof[rows, j - 1], prof[rows, j], prof[rows, j + 1]
    curv = left - 2.0 * mid + right
    concave = (curv < 0) & (mid >= left) & (mid >= right)
    vertex = np.where(concave, 0.5 * (left - right) / np.where(concave, curv, -1.0), 0.0)
    use_root = ok & (np.abs(root) <= 1.0)
    return t_grid[j] + np.where(use_root, root, np.clip(vertex, -0.5, 0.5))


# Default convergence tolerance on log(lam). The evidence is stationary at the optimum, so an error d in log(lam)
# moves the score by O(d^2) (far below 1e-8 relative at d = 1e-8) and the posterior means by O(d); Newton converges
# quadratically, so tightening to 1e-10 costs one more evaluation of every target for digits nothing uses.
SOLVER_TOL = 1e-8


def _solve(sp: _Spectrum, solver: str, tol: float, max_iter: int, grad_tol: float = 1e-10):
    """Maximise the evidence over lam = alpha/beta (beta = N/E(lam) in closed form) for all targets."""
    n = sp.n
    t_count = sp.p2.shape[0]
    s_pos = sp.s[sp.s > 0]
    # a scale-aware centre: the mean non-zero eigenvalue (the fixed point is scale-covariant)
    lam0 = float(s_pos.mean()) if s_pos.size else 1.0
    t = np.full(t_count, np.log(lam0)) if solver == "mackay" else _grid_start(sp, np.log(lam0))
    t_lo = np.log(lam0) - 80.0
    t_hi = np.log(lam0) + 80.0  # beyond this w = 0 for all practical purposes; the evidence is flat
    it = 0
    converged = False
    active = np.ones(t_count, dtype=bool)
    lo = np.full(t_count, -np.inf)
    hi = np.full(t_count, np.inf)
    prev1 = np.full(t_count, np.inf)  # |last step| and |step before| per target
    prev2 = np.full(t_count, np.inf)
    last_dir = np.zeros(t_count)
    for it in range(1, max_iter + 1):
        # while every target is still moving (most iterations), index with a slice: views, no copies
        sel: slice | np.ndarray = slice(None) if active.all() else np.flatnonzero(active)
        ti = t[sel].copy()
        lam = np.exp(ti)
        p2 = sp.p2[sel]
        gamma, s_inv2, e, m2, m3 = _stats(sp.s, p2, sp.yy[sel], sp.mode, lam)
        h = lam * m2 / e
        grad = 0.5 * gamma - 0.5 * n * h  # dL/dt
        if solver == "mackay":
            # alpha = gamma/||m||^2, beta = (N - gamma)/||Fm - y||^2, with ||Fm-y||^2 = E - lam ||m||^2
            r = np.maximum(e - lam * m2, 1e-300)
            alpha = gamma / np.maximum(m2, 1e-300)
            beta = (n - gamma) / r
            step = np.log(np.maximum(alpha / beta, 1e-300)) - ti
            quad_done = False
        else:
            # Safeguarded Newton on the 1-D profile: keep a bracket [lo, hi] with grad(lo) > 0 and
            # grad(hi) < 0 (so a maximum lies inside) and bisect whenever a step would leave it.
            blo = np.where(grad > 0, np.maximum(lo[sel], ti), lo[sel])
            bhi = np.where(grad < 0, np.minimum(hi[sel], ti), hi[sel])
            lo[sel] = blo
            hi[sel] = bhi
            # Newton on phi(t) = log(gamma / (N lam ||m||^2 / E)), the log of the MacKay fixed-point
            # ratio alpha_new/alpha: same sign and roots as grad, but nearly linear in t, and flat
            # (-> a long step) in the tails where the maximum is at lam -> 0 or inf.
            gamma_safe = np.maximum(gamma, 1e-300)
            phi = np.log(gamma_safe) - np.log(np.maximum(n * h, 1e-300))
            dphi = lam * (2.0 * m3 / np.maximum(m2, 1e-300) - s_inv2 / gamma_safe) + (h - 1.0)
            concave = dphi < 0
            step = np.where(concave, -phi / np.where(concave, dphi, -1.0), np.sign(grad))
            # Where a target's maximum is at lam -> inf (features without signal for it: w = 0) or
            # lam -> 0 (D >= N, features interpolate y: beta -> inf), the gradient decays like
            # exp(-|t|) and Newton crawls with steps ~1: after two such steps in an unbracketed
            # direction, stride ahead.
            big = np.abs(step) > 0.5
            forward = step > 0
            unbracketed = np.where(forward, np.isinf(bhi), np.isinf(blo))
            crawl = unbracketed & big & (np.sign(step) == last_dir[sel])
            if crawl.any():
                step = np.where(crawl, 4.0 * step, step)
            np.clip(step, -16.0, 16.0, out=step)
            last_dir[sel] = np.where(big, np.sign(step), 0.0)
            prop = ti + step
            both = np.isfinite(blo) & np.isfinite(bhi)
            # rtsafe rule: bisect when Newton leaves the bracket or does not at least halve the
            # step before last (guarantees the bracket shrinks; no two-point cycles)
            outside = (prop <= blo) | (prop >= bhi) | (both & (np.abs(step) > 0.5 * prev2[sel]))
            outside &= step != 0
            if outside.any():
                fallback = np.where(both, 0.5 * (blo + bhi), np.where(np.isinf(bhi), ti + 2.0, ti - 2.0))
                step = np.where(outside, fallback - ti, step)
            prev2[sel] = prev1[sel]
            prev1[sel] = np.abs(step)
            # Newton converges quadratically: after a plain step h the error is about K h^2, so stop after
            # taking it instead of paying one more evaluation when K h^2 <= tol. K is read off the last two
            # steps (h / h_prev^2; about 0.1-0.2 on real spectra) and trusted up to 1: h <= sqrt(tol) then;
            # without a previous step, h <= 0.1 sqrt(tol) assumes K <= 100.
            size = np.abs(step)
            contracting = np.isfinite(prev2[sel]) & (size <= prev2[sel] ** 2)
            quad_done = concave & ~outside & ~crawl & (
                (size <= 0.1 * np.sqrt(tol)) | (contracting & (size <= np.sqrt(tol))))
        t_new = np.clip(ti + step, t_lo, t_hi)
        # In the lam -> inf tail the evidence still to gain is about grad itself, so a gradient
        # below grad_tol (per sample) means the evidence is converged even if t is not.
        flat = np.abs(grad) <= grad_tol * n
        t_new = np.where(flat, ti, t_new)  # already at a stationary point: do not step off it
        done = flat | quad_done | (np.abs(t_new - ti) <= tol) | (hi[sel] - lo[sel] <= tol)
        done |= (t_new >= t_hi) & (grad >= 0)
        t[sel] = t_new
        active[sel if isinstance(sel, slice) else sel[done]] = ~done if isinstance(sel, slice) else False
        if not active.any():
            converged = True
            break
    return np.exp(t), it, converged


def _evidence(sp: _Spectrum, lam: np.ndarray):
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


def _spectrum_numpy(f: np.ndarray, y: Any, yy: np.ndarray | None = None):
    """y: targets (N, T), or a sparse (T, N) Y^T for one-hot targets (then yy must be given)."""
    n, d = f.shape
    if yy is None:
        yy = np.einsum("nt,nt->t", y, y)
    if n >= d:
        g = f.T @ f  # numpy dispatches A.T @ A to syrk
        s, v = np.linalg.eigh(g)
        s = np.maximum(s, 0.0)  # round-off can make zero eigenvalues slightly negative
        proj = v.T @ _transpose_times(f, y)  # (D, T)
        sp = _Spectrum(s, proj, yy, "gram_d", n, d)
        return sp, v
    k = f @ f.T
    s, u = np.linalg.eigh(k)
    s = np.maximum(s, 0.0)
    keep = kept_sample_directions(s)
    s, u = s[keep], u[:, keep]
    proj = _transpose_times(u, y)  # (N', T)
    sp = _Spectrum(s, proj, np.einsum("kt,kt->t", proj, proj), "gram_n", int(keep.sum()), d)
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


def _weights_numpy(f: np.ndarray, sp: _Spectrum, basis: np.ndarray, lam: np.ndarray) -> np.ndarray:
    inv = 1.0 / (lam[None, :] + sp.s[:, None])  # (k, T)
    if sp.mode == "gram_d":
        return (basis @ (sp.proj * inv)).T  # m = V diag(1/(lam+s)) V^T F^T y
    return (f.T @ (basis @ (sp.proj * inv))).T  # m = F^T (F F^T + lam)^-1 y


def _finish(sp: _Spectrum, lam, iters, converged, weights) -> LogMEResult:
    ev, alpha, beta = _evidence(sp, lam)
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
        if backend == "torch":
            import torch

            ft = torch.as_tensor(features)
            features = torch.cat([ft, torch.ones(ft.shape[0], 1, dtype=ft.dtype, device=ft.device)], 1)
        else:
            f0 = np.asarray(features, dtype=np.float64)
            features = np.hstack([f0, np.ones((f0.shape[0], 1))])
    if task == "classification":
        codes, c = class_codes(labels, num_classes)
        if backend == "torch":
            y = np.broadcast_to(np.zeros((1, 1)), (codes.shape[0], c))  # built on the device; only its shape here
        elif c >= SPARSE_ONE_HOT_CLASSES:
            y = one_hot_transposed(codes, c)  # (C, N)
        else:
            y = make_targets(codes, task, c)
    else:
        y = make_targets(labels, task, num_classes)
    if backend == "torch":
        from workers.ranking.logme_torch import spectrum_torch, weights_torch

        sp, ctx = spectrum_torch(features, y, device, codes if task == "classification" else None)
    elif backend == "numpy":
        f = np.asarray(features, dtype=np.float64)
        rows = y.shape[0] if isinstance(y, np.ndarray) else y.shape[1]
        if f.ndim != 2 or f.shape[0] != rows:
            raise ValueError(f"features {f.shape} do not match {rows} labels")
        # one-hot targets: ||y_c||^2 is the class count, no pass over the N x C matrix needed
        yy = y.sum(axis=0) if task == "multilabel" else None
        if task == "classification":
            yy = np.bincount(codes, minlength=c).astype(np.float64)
        sp, basis = _spectrum_numpy(f, y, yy)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    empty = sp.yy <= 0
    if empty.any():
        bad = np.flatnonzero(empty).tolist()
        raise ValueError(f"targets {bad} are all zero (a class with no examples?); LogME is undefined")
    lam, iters, converged = _solve(sp, solver, tol, max_iter)
    weights = np.empty((0, sp.d))
    if compute_weights:
        if backend == "torch":
            weights = weights_torch(ctx, sp, lam)
        else:
            weights = _weights_numpy(f, sp, basis, lam)
    return _finish(sp, lam, iters, converged, weights)


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
    sp = _Spectrum(s, proj, yy, "gram_d", n_b, d)
    lam, iters, converged = _solve(sp, "newton", tol, max_iter)
    return _finish(sp, lam, iters, converged, np.empty((0, d)))


def _dense_fit(features: Any, labels: Any, task: str, num_classes: int | None, *, compute_weights: bool):
    """LogME on dense targets, keeping what the per-row functions below need: features, targets, spectrum, basis,
    lam and the result (posterior means when compute_weights)."""
    y = make_targets(labels, task, num_classes)
    f = np.asarray(features, dtype=np.float64)
    sp, basis = _spectrum_numpy(f, y)
    lam, iters, converged = _solve(sp, "newton", SOLVER_TOL, 1000)
    weights = _weights_numpy(f, sp, basis, lam) if compute_weights else np.empty((0, sp.d))
    return f, y, sp, basis, lam, _finish(sp, lam, iters, converged, weights)


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
    n, d = f.shape
    sp, basis = _spectrum_numpy(f, y)
    # leading-first spectrum in D-space coordinates: sigma_j and b_j = v_j^T F^T y
    order = np.argsort(sp.s)[::-1]
    s_sorted = sp.s[order]
    if sp.mode == "gram_d":
        b = sp.proj[order]
        v_sorted = basis[:, order]
    else:
        x = sp.proj[order]
        b = np.sqrt(s_sorted)[:, None] * x
        u_sorted = basis[:, order]
        # right singular vectors v_j = F^T u_j / sqrt(s_j) (only for s_j > 0)
        pos = s_sorted > s_sorted[0] * 1e-12
        v_sorted = np.zeros((d, len(order)))
        v_sorted[:, pos] = (f.T @ u_sorted[:, pos]) / np.sqrt(s_sorted[pos])
    rank_dim = min(sp.n, d)  # sp.n: directions kept when N < D (see kept_sample_directions)
    cand = sorted({int(k) for k in (dims if dims is not None else _default_dims(rank_dim)) if 1 <= k <= rank_dim})
    scores: dict[int, float] = {}
    best = None
    for k in cand:
        sub = _Spectrum(s_sorted[:k], b[:k], sp.yy, "gram_d", sp.n, k)
        lam, iters, conv = _solve(sub, "newton", SOLVER_TOL, 1000)
        res = _finish(sub, lam, iters, conv, np.empty((0, k)))
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

"""The maximisation of LogME's evidence over lam = alpha / beta, for every target at once (beta = N / E(lam) in
closed form, see workers.ranking.logme): safeguarded Newton steps on the log of MacKay's fixed-point ratio from a
grid start (the default, `solver="newton"`), or MacKay's fixed-point iteration itself (`solver="mackay"`, linear
convergence, kept for cross-checking; thuml/LogME's `_fit_fixed_point` iterates the same update). Both stop on the
same rules, so they reach the same fixed point.

Works on the eigen-data of the features (`EigenData`: logme.Spectrum), never on the features themselves: every
evaluation is O(k T) for k eigenvalues and T targets.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class EigenData(Protocol):
    """What the solver reads of a spectrum (workers.ranking.logme.Spectrum)."""

    s: np.ndarray  # (k,) eigenvalues kept
    p2: np.ndarray  # (T, k) squared projections of each target on the eigen-directions
    yy: np.ndarray  # (T,) ||y||^2
    mode: str  # "gram_d" (F^T F) or "gram_n" (F F^T)
    n: float  # rows (or sample directions kept; a sum of counts when weighted)


def evidence_sums(s: np.ndarray, p2: np.ndarray, yy: np.ndarray, mode: str, lam: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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
GRID_OFFSETS = np.arange(-16.0, 16.5, 1.0)


def grid_start(sp: EigenData, t_centre: float) -> np.ndarray:
    """A starting log(lam) per target: the best of a grid of profile evidences, refined by the root of phi.

    At beta = N/E(lam) the log evidence is, up to a constant, k/2 log lam - N/2 log E(lam) - 1/2 sum log(lam + s_i),
    so the whole grid for all targets costs one (T, k) x (k, J) product. Around the best grid point the start is
    the root of the quadratic through phi (the log MacKay ratio Newton works on, see `solve`) at the three nearest
    grid points: phi is nearly linear in t, so that root lands within ~0.005 of the optimum (a parabola through the
    profile: ~0.05), and Newton then needs two evaluations for most targets instead of three. One more
    (T, k) x (k, J) product (||m||^2 on the grid) pays for it."""
    t_grid = t_centre + GRID_OFFSETS
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


class _NewtonState:
    """Per-target state of the safeguarded Newton iteration: the bracket [lo, hi] of the maximum, the last two step
    sizes and the direction of the last long step."""

    def __init__(self, t_count: int) -> None:
        self.lo = np.full(t_count, -np.inf)
        self.hi = np.full(t_count, np.inf)
        self.prev1 = np.full(t_count, np.inf)  # |last step| and |step before| per target
        self.prev2 = np.full(t_count, np.inf)
        self.last_dir = np.zeros(t_count)

    def step(self, sel: slice | np.ndarray, ti: np.ndarray, lam: np.ndarray, n: float, tol: float,
             sums: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(step in t, quad_done) for the targets `sel` at t = ti; sums: grad, gamma, h, m2, m3, s_inv2 there."""
        grad, gamma, h, m2, m3, s_inv2 = sums
        lo, hi, prev1, prev2, last_dir = self.lo, self.hi, self.prev1, self.prev2, self.last_dir
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
        return step, quad_done


def _mackay_step(ti: np.ndarray, lam: np.ndarray, gamma: np.ndarray, e: np.ndarray, m2: np.ndarray,
                 n: float) -> np.ndarray:
    """MacKay's update as a step in t = log lam: alpha = gamma/||m||^2, beta = (N - gamma)/||Fm - y||^2, with
    ||Fm-y||^2 = E - lam ||m||^2."""
    r = np.maximum(e - lam * m2, 1e-300)
    alpha = gamma / np.maximum(m2, 1e-300)
    beta = (n - gamma) / r
    return np.log(np.maximum(alpha / beta, 1e-300)) - ti


def solve(sp: EigenData, solver: str, tol: float, max_iter: int,
          grad_tol: float = 1e-10) -> tuple[np.ndarray, int, bool]:
    """Maximise the evidence over lam = alpha/beta (beta = N/E(lam) in closed form) for all targets:
    (lam (T,), iterations, converged)."""
    n = sp.n
    t_count = sp.p2.shape[0]
    s_pos = sp.s[sp.s > 0]
    # a scale-aware centre: the mean non-zero eigenvalue (the fixed point is scale-covariant)
    lam0 = float(s_pos.mean()) if s_pos.size else 1.0
    t = np.full(t_count, np.log(lam0)) if solver == "mackay" else grid_start(sp, np.log(lam0))
    t_lo = np.log(lam0) - 80.0
    t_hi = np.log(lam0) + 80.0  # beyond this w = 0 for all practical purposes; the evidence is flat
    active = np.ones(t_count, dtype=bool)
    state = _NewtonState(t_count)
    for it in range(1, max(max_iter, 0) + 1):
        # while every target is still moving (most iterations), index with a slice: views, no copies
        sel: slice | np.ndarray = slice(None) if active.all() else np.flatnonzero(active)
        ti = t[sel].copy()
        lam = np.exp(ti)
        p2 = sp.p2[sel]
        gamma, s_inv2, e, m2, m3 = evidence_sums(sp.s, p2, sp.yy[sel], sp.mode, lam)
        h = lam * m2 / e
        grad = 0.5 * gamma - 0.5 * n * h  # dL/dt
        if solver == "mackay":
            step = _mackay_step(ti, lam, gamma, e, m2, n)
            quad_done: np.ndarray | bool = False
        else:
            step, quad_done = state.step(sel, ti, lam, n, tol, (grad, gamma, h, m2, m3, s_inv2))
        t_new = np.clip(ti + step, t_lo, t_hi)
        # In the lam -> inf tail the evidence still to gain is about grad itself, so a gradient
        # below grad_tol (per sample) means the evidence is converged even if t is not.
        flat = np.abs(grad) <= grad_tol * n
        t_new = np.where(flat, ti, t_new)  # already at a stationary point: do not step off it
        done = flat | quad_done | (np.abs(t_new - ti) <= tol) | (state.hi[sel] - state.lo[sel] <= tol)
        done |= (t_new >= t_hi) & (grad >= 0)
        t[sel] = t_new
        active[sel if isinstance(sel, slice) else sel[done]] = ~done if isinstance(sel, slice) else False
        if not active.any():
            return np.exp(t), it, True
    return np.exp(t), max(max_iter, 0), False

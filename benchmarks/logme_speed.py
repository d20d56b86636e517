"""LogME speed against the unavoidable linear-algebra floor, measured in the same run.

Floor (per configuration, on the same arrays): form the Gram matrix of the smaller side (F^T F when
N >= D, else F F^T), one symmetric eigendecomposition (np.linalg.eigh), and the projections of all
targets onto the eigenvectors as one matrix product (V^T (F^T Y), or U^T Y). Everything else LogME
does (building targets, the alpha/beta solve, the evidence, the posterior means) is overhead.
LogME forms F^T Y for one-hot targets with C >= SPARSE_ONE_HOT_CLASSES as per-class row sums, which is
cheaper than the floor's product; the 'strict' floor does the same, so ours/strict is the overhead
with no credit for that (the same as ours/floor where the dense product is used).
Also times a port of the thuml/LogME reference solver (`_fit_fixed_point`, published default) and
checks our per-target evidence against a straightforward per-target computation (explicit
Cholesky of alpha I + beta F^T F, explicit residual) at our alpha, beta.

    .venv/bin/python benchmarks/logme_speed.py            # full grid (N x D x C x task)
    .venv/bin/python benchmarks/logme_speed.py --quick    # small subset
    .venv/bin/python benchmarks/logme_speed.py --torch    # also the torch backend (GPU if present)
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Any

import numpy as np

from workers.ranking import logme, make_targets
from workers.ranking.targets import SPARSE_ONE_HOT_CLASSES, one_hot_transposed, transpose_times


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def floor_ops(f: np.ndarray, y: Any) -> None:
    """The floor as issue 4 defines it: F^T F (or F F^T), one eigh, the projections of all targets. y dense
    (N, T) forms F^T Y as a matrix product; a sparse one-hot Y^T (T, N) as per-class row sums, as LogME does from
    SPARSE_ONE_HOT_CLASSES classes on (the 'strict' floor)."""
    n, d = f.shape
    if n >= d:
        g = f.T @ f
        _, v = np.linalg.eigh(g)
        v.T @ transpose_times(f, y)
    else:
        k = f @ f.T
        _, u = np.linalg.eigh(k)
        transpose_times(u, y)


def thuml_reference(f: np.ndarray, y: np.ndarray) -> float:
    """Port of thuml/LogME LogME._fit_fixed_point (numpy instead of numba; same operations)."""
    n, d = f.shape
    if n > d:
        u, s, vh = np.linalg.svd(f.T @ f)
        s = np.sqrt(s)
        u_times_sigma = f @ vh.T
        k = int(np.sum(s > 1e-10))
        s = s[:k].reshape(-1, 1)
        vh = vh[:k]
        u = u_times_sigma[:, :k] / s.reshape(1, -1)
    else:
        u, s, vh = np.linalg.svd(f, full_matrices=False)
        s = s.reshape(-1, 1)
    sigma = s**2
    evs = []
    for i in range(y.shape[1]):
        y_ = y[:, i : i + 1]
        x = u.T @ y_
        x2 = x**2
        res_x2 = (y_**2).sum() - x2.sum()
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = (sigma / (sigma + t)).sum()
            m2 = (sigma * x2 / ((t + sigma) ** 2)).sum()
            res2 = (x2 / ((1 + sigma / t) ** 2)).sum() + res_x2
            alpha = gamma / (m2 + 1e-5)
            beta = (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= 1e-3:
                break
        ev = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * sigma))
              - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi))
        _m = (vh.T @ (1.0 / (t + sigma) * s * x)).reshape(-1)  # the reference also forms m (timed, unused)
        evs.append(ev / n)
    return float(np.mean(evs))


def straightforward(f: np.ndarray, g: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """Per-target evidence / N from explicit matrices at the given alpha, beta (no eigen-tricks):
    Cholesky of alpha I + beta F^T F (g = F^T F, formed once per configuration), explicit residual.
    When D > N that D x D matrix is hopelessly ill-conditioned at the optimum (beta -> inf: the
    features interpolate y), so there the N x N closed form log N(y | 0, F F^T/alpha + I/beta) is used."""
    import scipy.linalg as sl

    n, d = f.shape
    if d > n:
        cov = (f @ f.T) / alpha + np.eye(n) / beta
        c = sl.cho_factor(cov)
        z = sl.cho_solve(c, y)
        logdet = 2.0 * np.sum(np.log(np.diag(c[0])))
        return (-0.5 * y @ z - 0.5 * logdet - n / 2 * np.log(2 * np.pi)) / n
    a = alpha * np.eye(d) + beta * g
    c = sl.cho_factor(a)
    m = beta * sl.cho_solve(c, f.T @ y)
    logdet = 2.0 * np.sum(np.log(np.diag(c[0])))
    r = f @ m - y
    ev = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * logdet - beta / 2 * r @ r
          - alpha / 2 * m @ m - n / 2 * np.log(2 * np.pi))
    return ev / n


def make_data(noise: np.ndarray, c: int, task: str, rng: np.random.Generator):
    """Class structure in a 16-d subspace plus isotropic noise (a realistic mix of informative and
    uninformative targets); regression targets are a noisy linear map of the features."""
    n, d = noise.shape
    labels = rng.integers(0, c, n)
    basis = rng.normal(size=(16, d)) / 4.0
    f = noise + rng.normal(size=(c, 16))[labels] @ basis
    if task == "classification":
        return f, labels
    w = rng.normal(size=(d, c)) / np.sqrt(d)
    return f, f @ w + rng.normal(size=(n, c))


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--torch", action="store_true", help="also time backend='torch'")
    ap.add_argument("--no-thuml", action="store_true")
    ap.add_argument("--grid", help="N,D,C lists to time instead, e.g. '1000;384;100' or '1000,10000;384;2,100'")
    ap.add_argument("--repeats", type=int, help="interleaved repeats per configuration (default: by size)")
    args = ap.parse_args()
    ns, ds, cs = (([1000, 10000], [384, 768], [2, 100]) if args.quick
                  else ([1000, 10000, 50000], [384, 768, 2048], [2, 10, 100]))
    if args.grid:
        ns, ds, cs = ([int(v) for v in part.split(",")] for part in args.grid.split(";"))
    tasks = ["classification", "regression"]
    print(f"# machine: {platform.node()} nproc={os.cpu_count()} cpu={cpu_model()!r} numpy={np.__version__}")
    if args.torch:
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"# torch {torch.__version__} device={dev}"
              + (f" ({torch.cuda.get_device_name()})" if dev == "cuda" else ""))
    hdr = (f"{'N':>6} {'D':>5} {'C':>4} {'task':>14} {'floor_s':>8} {'ours_s':>8} {'ratio':>6} {'score/fl':>8} "
           f"{'strict':>6} {'sc/strict':>9} {'thuml_s':>8} {'thuml/ours':>10} {'iters':>5} {'max_rel_diff':>12}")
    if args.torch:
        hdr += f" {'torch_s':>8}"
    print(hdr, flush=True)
    rng = np.random.default_rng(0)
    ratios, score_ratios, strict_ratios, strict_score_ratios, diffs = [], [], [], [], []
    for n in ns:
        for d in ds:
            noise = rng.standard_normal(size=(n, d))
            big = n * d * max(n, d) > 2e10
            # small floors (~20 ms) move by +-15% between repeats on this shared machine: take more of them
            repeats = args.repeats or (2 if big else (15 if n * d * max(n, d) < 1e9 else 5))
            for c in cs:
                for task in tasks:
                    f, lab = make_data(noise, c, task, rng)
                    y = make_targets(lab, task)
                    sums = task == "classification" and c >= SPARSE_ONE_HOT_CLASSES
                    y_strict = one_hot_transposed(lab, c) if sums else y
                    kw = {"num_classes": c} if task == "classification" else {}
                    # interleave so slow drifts of a shared machine hit both alike
                    tf, tfs, to, ts = [], [], [], []
                    res = None
                    for _ in range(repeats):
                        tf.append(best_of(lambda f=f, y=y: floor_ops(f, y), 1))
                        tfs.append(best_of(lambda f=f, y=y_strict: floor_ops(f, y), 1) if sums else tf[-1])
                        t0 = time.perf_counter()
                        res = logme(f, lab, task, **kw)
                        to.append(time.perf_counter() - t0)
                        # the score alone, as a rank job computes it (posterior means are B-Tuning's)
                        ts.append(best_of(lambda f=f, lab=lab, task=task, kw=kw:
                                          logme(f, lab, task, compute_weights=False, **kw), 1))
                    t_floor, t_strict, t_ours, t_score = min(tf), min(tfs), min(to), min(ts)
                    # the reference is slow: time it once per (N, D), classification, C = 10 (or first C)
                    th = ""
                    if not args.no_thuml and task == "classification" and c == (10 if 10 in cs else cs[0]):
                        t_th = best_of(lambda f=f, y=y: thuml_reference(f, y), 1 if big else 2)
                        th = f"{t_th:8.3f} {t_th / t_ours:10.2f}"
                    else:
                        th = f"{'':>8} {'':>10}"
                    # straightforward check on up to 3 targets (each needs a D x D Cholesky)
                    rel = 0.0
                    g = f.T @ f if n >= d else None
                    for k in range(min(3, y.shape[1])):
                        ref = straightforward(f, g, y[:, k], res.alpha[k], res.beta[k])
                        rel = max(rel, abs(ref - res.evidence_per_target[k]) / abs(ref))
                    line = (f"{n:>6} {d:>5} {c:>4} {task:>14} {t_floor:8.3f} {t_ours:8.3f} {t_ours / t_floor:6.3f} "
                            f"{t_score / t_floor:8.3f} {t_ours / t_strict:6.3f} {t_score / t_strict:9.3f} "
                            f"{th} {res.iterations:>5} {rel:12.2e}")
                    if args.torch:
                        t_t = best_of(lambda f=f, lab=lab, task=task, kw=kw: logme(f, lab, task, backend="torch", **kw),
                                      repeats)
                        line += f" {t_t:8.3f}"
                    print(line, flush=True)
                    ratios.append(t_ours / t_floor)
                    score_ratios.append(t_score / t_floor)
                    strict_ratios.append(t_ours / t_strict)
                    strict_score_ratios.append(t_score / t_strict)
                    del f, g, y, y_strict
                    diffs.append(rel)
    print(f"# ratio ours/floor: max {max(ratios):.3f}, median {np.median(ratios):.3f}, "
          f"{sum(r <= 1.1 for r in ratios)}/{len(ratios)} <= 1.10; score only: max {max(score_ratios):.3f}, "
          f"median {np.median(score_ratios):.3f}, {sum(r <= 1.1 for r in score_ratios)}/{len(score_ratios)} <= 1.10; "
          f"against the strict floor: max {max(strict_ratios):.3f}, median {np.median(strict_ratios):.3f}, "
          f"{sum(r <= 1.1 for r in strict_ratios)}/{len(strict_ratios)} <= 1.10, score only max "
          f"{max(strict_score_ratios):.3f}, {sum(r <= 1.1 for r in strict_score_ratios)}/{len(strict_score_ratios)} "
          "<= 1.10; "
          f"max rel diff vs straightforward {max(diffs):.1e}")


if __name__ == "__main__":
    main()

"""LogME checked against independent computations: a per-class brute-force implementation, the
Gaussian marginal likelihood in closed form (scipy), numerical stationarity, and a port of the
thuml reference's fixed point where that reference is right (N >> D)."""

import numpy as np
import pytest
from scipy import optimize
from scipy.stats import multivariate_normal

from workers.ranking import logme, prior_only_evidence

# ---------- independent references (written for the tests; no code shared with the module) ----------

def brute_evidence(f, y, alpha, beta):
    """log p(y|F,alpha,beta) with a full D x D inverse and slogdet."""
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.inv(a) @ f.T @ y
    sign, logdet = np.linalg.slogdet(a)
    assert sign > 0
    return (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * logdet
            - beta / 2 * np.sum((f @ m - y) ** 2) - alpha / 2 * m @ m - n / 2 * np.log(2 * np.pi))


def brute_mackay(f, y, iters=20000):
    """Plain MacKay fixed point per target with explicit matrices, run to convergence."""
    n, d = f.shape
    g = f.T @ f
    eig = np.linalg.eigvalsh(g)
    alpha, beta = 1.0, 1.0
    for _ in range(iters):
        a = alpha * np.eye(d) + beta * g
        m = beta * np.linalg.solve(a, f.T @ y)
        gamma = np.sum(beta * eig / (alpha + beta * eig))
        alpha_new = gamma / (m @ m)
        beta_new = (n - gamma) / np.sum((f @ m - y) ** 2)
        if abs(alpha_new - alpha) <= 1e-13 * alpha and abs(beta_new - beta) <= 1e-13 * beta:
            alpha, beta = alpha_new, beta_new
            break
        alpha, beta = alpha_new, beta_new
    return alpha, beta


def closed_form(f, y, alpha, beta):
    """log N(y | 0, F F^T / alpha + I / beta): the same evidence, no eigen-tricks at all."""
    n = f.shape[0]
    cov = f @ f.T / alpha + np.eye(n) / beta
    return multivariate_normal(mean=np.zeros(n), cov=cov).logpdf(y)


def thuml_fixed_point(f, y_targets):
    """Port of thuml/LogME `_fit_fixed_point` (the published default solver; 11 iterations,
    1e-3 tolerance, non-zero singular values only) to compare where it is right (N >> D)."""
    n, d = f.shape
    u, s, vh = np.linalg.svd(f, full_matrices=False)
    s = s.reshape(-1, 1)
    sigma = s ** 2
    evidences = []
    for i in range(y_targets.shape[1]):
        y_ = y_targets[:, i].reshape(-1, 1)
        x = u.T @ y_
        x2 = x ** 2
        res_x2 = (y_ ** 2).sum() - x2.sum()
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = (sigma / (sigma + t)).sum()
            m2 = (sigma * x2 / ((t + sigma) ** 2)).sum()
            res2 = (x2 / ((1 + sigma / t) ** 2)).sum() + res_x2
            alpha = gamma / (m2 + 1e-5)
            beta = (n - gamma) / (res2 + 1e-5)
            t_ = alpha / beta
            if abs(t_ - t) / t <= 1e-3:
                break
        evidence = (d / 2.0 * np.log(alpha) + n / 2.0 * np.log(beta)
                    - 0.5 * np.sum(np.log(alpha + beta * sigma)) - beta / 2.0 * res2
                    - alpha / 2.0 * m2 - n / 2.0 * np.log(2 * np.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def informative(n, d, c, seed, scale=1.0):
    """Features carrying every class (class means + noise), so each class has a finite optimum."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    rng.shuffle(y)
    means = rng.normal(size=(c, d)) * scale
    f = means[y] + rng.normal(size=(n, d))
    return f, y


def onehot(y, c):
    return np.eye(c)[y]


# ---------- tests ----------

@pytest.mark.parametrize("n,d,c", [(300, 20, 3), (60, 90, 4)])
def test_matches_per_class_brute_force(n, d, c):
    f, y = informative(n, d, c, seed=1, scale=0.5)
    res = logme(f, y)
    assert res.converged
    yt = onehot(y, c)
    brute = []
    for k in range(c):
        # evidence at OUR alpha, beta from the brute formula
        ev = brute_evidence(f, yt[:, k], res.alpha[k], res.beta[k])
        assert ev / n == pytest.approx(res.evidence_per_target[k], rel=1e-8)
        # and brute-force's own fixed point lands on the same alpha, beta
        a, b = brute_mackay(f, yt[:, k])
        assert a == pytest.approx(res.alpha[k], rel=1e-6)
        assert b == pytest.approx(res.beta[k], rel=1e-6)
        brute.append(brute_evidence(f, yt[:, k], a, b) / n)
        # posterior mean
        m = res.beta[k] * np.linalg.inv(res.alpha[k] * np.eye(d) + res.beta[k] * f.T @ f) @ f.T @ yt[:, k]
        np.testing.assert_allclose(res.weights[k], m, rtol=1e-7, atol=1e-10)
    assert res.score == pytest.approx(np.mean(brute), rel=1e-8)
    assert res.weights.shape == (c, d)


@pytest.mark.parametrize("n,d", [(80, 10), (40, 120)])
def test_equals_gaussian_marginal_likelihood(n, d):
    f, y = informative(n, d, 2, seed=2)
    res = logme(f, y)
    yt = onehot(y, 2)
    for k in range(2):
        ev = closed_form(f, yt[:, k], res.alpha[k], res.beta[k])
        assert ev / n == pytest.approx(res.evidence_per_target[k], rel=1e-9)


def test_alpha_beta_are_stationary():
    n, d = 120, 15
    f, y = informative(n, d, 3, seed=3, scale=0.4)
    res = logme(f, y)
    yt = onehot(y, 3)
    h = 1e-4
    for k in range(3):
        la, lb = np.log(res.alpha[k]), np.log(res.beta[k])
        def ev(a, b, k=k):
            return closed_form(f, yt[:, k], np.exp(a), np.exp(b))
        g_a = (ev(la + h, lb) - ev(la - h, lb)) / (2 * h)
        g_b = (ev(la, lb + h) - ev(la, lb - h)) / (2 * h)
        assert abs(g_a) < 1e-5 * n and abs(g_b) < 1e-5 * n
        # and it is a maximum: nearby points are lower
        assert ev(la, lb) >= max(ev(la + 0.05, lb), ev(la - 0.05, lb), ev(la, lb + 0.05), ev(la, lb - 0.05))


def test_wide_features_exact_where_dropping_zero_eigenvalues_is_wrong():
    n, d = 50, 200
    f, y = informative(n, d, 2, seed=4, scale=0.3)
    res = logme(f, y)
    yt = onehot(y, 2)
    for k in range(2):
        a, b = res.alpha[k], res.beta[k]
        exact = closed_form(f, yt[:, k], a, b) / n
        assert exact == pytest.approx(res.evidence_per_target[k], rel=1e-9)
        # the "drop zero eigenvalues" variant (thuml default solver) omits -(D-N)/2 log(alpha)
        dropped = exact + 0.5 * (d - n) * np.log(a) / n
        assert abs(dropped - exact) > 0.1
    # the thuml reference solver itself reports a number above the true maximum evidence
    # (impossible for an exact evidence) on these wide features
    assert thuml_fixed_point(f, yt) > res.score + 0.1


def test_agrees_with_thuml_reference_when_n_much_larger_than_d():
    f, y = informative(3000, 24, 4, seed=5, scale=0.3)
    ours = logme(f, y).score
    ref = thuml_fixed_point(f, onehot(y, 4))
    # the reference stops at 1e-3 relative change of alpha/beta and adds 1e-5 to denominators;
    # the evidence is stationary there, so the scores agree to second order
    assert ours == pytest.approx(ref, rel=1e-5)
    assert ours >= ref - 1e-12  # ours is the maximum


def test_newton_and_mackay_solvers_agree_and_torch_matches():
    f, y = informative(400, 30, 5, seed=6, scale=0.3)
    a = logme(f, y)
    b = logme(f, y, solver="mackay", max_iter=20000)
    np.testing.assert_allclose(a.evidence_per_target, b.evidence_per_target, rtol=1e-9)
    t = logme(f, y, backend="torch", device="cpu")
    np.testing.assert_allclose(t.evidence_per_target, a.evidence_per_target, rtol=1e-10)
    np.testing.assert_allclose(t.weights, a.weights, rtol=1e-7, atol=1e-12)
    tw = logme(f[:20], y[:20], backend="torch", device="cpu")  # D > N path
    np.testing.assert_allclose(tw.score, logme(f[:20], y[:20]).score, rtol=1e-10)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device")
def test_torch_backend_on_cuda_matches_numpy():
    f, y = informative(2000, 64, 10, seed=8, scale=0.3)
    a = logme(f, y)
    t = logme(f, y, backend="torch", device="cuda")
    np.testing.assert_allclose(t.evidence_per_target, a.evidence_per_target, rtol=1e-9)
    r = logme(f[:, 1:], f[:, 0], task="regression", backend="torch", device="cuda")
    np.testing.assert_allclose(r.score, logme(f[:, 1:], f[:, 0], task="regression").score, rtol=1e-9)


def test_prior_only_evidence_is_the_maximised_bias_only_marginal_likelihood():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, 40)
    yt = onehot(y, 3)
    ones = np.ones((40, 1))
    per = []
    for k in range(3):
        def nll(p, k=k):
            return -closed_form(ones, yt[:, k], np.exp(p[0]), np.exp(p[1]))
        best = optimize.minimize(nll, x0=[0.0, 1.0], method="Nelder-Mead",
                                 options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 5000})
        per.append(-best.fun / 40)
    assert prior_only_evidence(y) == pytest.approx(np.mean(per), rel=1e-7)


def test_multilabel_and_regression_shapes_and_signal_beats_noise():
    rng = np.random.default_rng(8)
    n, d = 500, 16
    f = rng.normal(size=(n, d))
    noise = rng.normal(size=(n, d))
    w = rng.normal(size=(d, 3))
    yr = f @ w + 0.5 * rng.normal(size=(n, 3))
    r = logme(f, yr, task="regression")
    assert r.weights.shape == (3, d) and r.evidence_per_target.shape == (3,)
    assert r.score > logme(noise, yr, task="regression").score
    r1 = logme(f, yr[:, 0], task="regression")
    assert r1.weights.shape == (1, d)
    assert r1.score == pytest.approx(r.evidence_per_target[0], rel=1e-10)
    # regression targets are not standardised: scaling y by c shifts the per-sample score by -log c
    assert logme(f, 10 * yr, task="regression").score == pytest.approx(r.score - np.log(10), rel=1e-9)

    ym = (f @ w > 0).astype(int)
    m = logme(f, ym, task="multilabel", add_bias=True)
    assert m.weights.shape == (3, d + 1) and m.alpha.shape == (3,)
    assert m.score > logme(noise, ym, task="multilabel", add_bias=True).score
    assert m.score > prior_only_evidence(ym, task="multilabel")

    yc = np.argmax(f[:, :4], axis=1)
    assert logme(f, yc).score > logme(noise, yc).score


def test_rejects_empty_class():
    f = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError):
        logme(f, np.zeros(10, dtype=int), num_classes=2)


@pytest.mark.parametrize("seed", range(8))
def test_random_cases_reach_the_maximum_of_a_brute_force_grid(seed):
    """Scales from 1e-3 to 1e3, D < N and D > N, weak and strong signal: no grid point of the
    closed-form evidence over (log alpha, log beta) may beat the solver's maximum."""
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(15, 50))
    d = int(rng.choice([1, 3, 10, 40, 80]))
    c = int(rng.integers(2, 4))
    f, y = informative(n, d, c, seed=seed, scale=float(rng.choice([0.0, 0.3, 2.0])))
    f *= 10.0 ** rng.uniform(-3, 3)
    res = logme(f, y)
    assert res.converged
    yt = onehot(y, c)
    k = int(rng.integers(0, c))
    ours = res.evidence_per_target[k] * n
    assert closed_form(f, yt[:, k], res.alpha[k], res.beta[k]) == pytest.approx(ours, rel=1e-8)
    la, lb = np.log(res.alpha[k]), np.log(res.beta[k])
    for da in np.linspace(-6, 6, 13):
        for db in np.linspace(-6, 6, 13):
            assert closed_form(f, yt[:, k], np.exp(la + da), np.exp(lb + db)) <= ours + 1e-7 * abs(ours)


def occam_case(seed):
    """Few examples, wide features: the label signal lives in one direction of 768 noisy ones;
    plus a narrow 32-d 'random model' whose features carry nothing but a constant offset."""
    rng = np.random.default_rng(seed)
    n, d = 100, 768
    y = rng.integers(0, 2, n)
    f = rng.normal(size=(n, d)) + 0.2 * rng.normal(size=d)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    f += np.outer(2 * y - 1, u) * 1.5
    narrow = rng.normal(size=(n, 32)) * 0.1 + 1.0
    return f, narrow, y


@pytest.mark.parametrize("seed", [1, 2, 4, 5])
def test_projected_logme_fixes_the_occam_failure(seed):
    from workers.ranking.logme_variants import logme_projected

    f, narrow, y = occam_case(seed)
    prior = prior_only_evidence(y)
    plain = logme(f, y).score
    # the failure: a real signal scores below the label prior and below a narrow uninformative model
    assert plain < prior
    assert plain < logme(narrow, y).score
    proj = logme_projected(f, y)
    assert proj.score > prior
    assert proj.score > logme_projected(narrow, y).score
    assert proj.k < 768
    # the score at the chosen k is plain LogME of the materialised projection F V_k
    direct = logme(proj.project(f), y)
    assert proj.score == pytest.approx(direct.score, rel=1e-8)
    np.testing.assert_allclose(proj.result.weights, direct.weights, rtol=1e-6, atol=1e-10)


def test_projected_logme_keeps_cases_logme_already_gets_right():
    from workers.ranking.logme_variants import logme_projected

    rng = np.random.default_rng(11)
    n = 3000
    y = rng.integers(0, 4, n)
    good = rng.normal(size=(n, 64)) + np.eye(4, 64)[y] * 1.5
    weak = rng.normal(size=(n, 64)) + np.eye(4, 64)[y] * 0.3
    pg, pw = logme_projected(good, y), logme_projected(weak, y)
    assert logme(good, y).score > logme(weak, y).score and pg.score > pw.score
    for f, p in ((good, pg), (weak, pw)):
        # full width plus the constant column (the features' root-mean-square entry) is a candidate
        with_ones = logme(np.hstack([f, np.full((n, 1), np.sqrt(np.mean((f ** 2).sum(1))))]), y).score
        assert p.score >= with_ones - 1e-12
        assert p.scores_by_k[65] == pytest.approx(with_ones, rel=1e-9)
        bias_free = logme_projected(f, y, intercept=False)
        assert bias_free.score >= logme(f, y).score - 1e-12
        assert bias_free.scores_by_k[64] == pytest.approx(logme(f, y).score, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_projected_logme_intercept_lets_every_model_fit_the_class_prior_alike(seed):
    """A nearly constant narrow model (what mean pooling of a randomly initialised encoder gives) fits the class
    prior through its constant direction for free; centred wide features with a real but weak class signal
    cannot fit it at all without a bias, and plain LogME scores them below the uninformative model and below the
    prior. With the intercept, the uninformative model scores the prior baseline and the signal wins."""
    from workers.ranking.logme_variants import logme_projected

    rng = np.random.default_rng(seed)
    n = 200
    y = rng.integers(0, 3, n)
    wide = rng.normal(size=(n, 32)) + rng.normal(size=(3, 32))[y] * 0.2
    wide -= wide.mean(axis=0)
    constant = 3.0 + 0.05 * rng.normal(size=(n, 4))
    prior = prior_only_evidence(y)
    assert logme(wide, y).score < prior < logme(constant, y).score + 1e-3  # the failure
    assert logme_projected(wide, y, intercept=False).score < logme_projected(constant, y, intercept=False).score
    fixed_wide, fixed_constant = logme_projected(wide, y), logme_projected(constant, y)
    assert fixed_wide.score > fixed_constant.score
    assert fixed_constant.score == pytest.approx(prior, abs=2e-3)
    # the score is LogME of the materialised projection, ones column included
    assert fixed_wide.score == pytest.approx(logme(fixed_wide.project(wide), y).score, rel=1e-8)


def test_coinciding_rows_count_once_when_n_is_below_d():
    """Two identical rows (same label) with N < D: the direction (e_0 - e_1)/sqrt(2) is invisible to the features
    and would make the evidence unbounded. Dropping it is LogME on the data rotated so that the pair becomes one row
    (sqrt(2) f_0, sqrt(2) y_0): an independent reference computed on that merged data set."""
    rng = np.random.default_rng(3)
    n, d, c = 40, 90, 3
    labels = rng.integers(0, c, n)
    f = rng.normal(size=(n, d))
    f[:, :c] += 2.0 * np.eye(c)[labels]
    f[1], labels[1] = f[0], labels[0]
    onehot = np.eye(c)[labels]
    merged_f = np.vstack([np.sqrt(2.0) * f[0], f[2:]])
    merged_y = np.vstack([np.sqrt(2.0) * onehot[0], onehot[2:]])
    got = logme(f, labels)
    want = logme(merged_f, merged_y, task="regression")
    assert got.score == pytest.approx(want.score, rel=1e-8)
    assert np.allclose(got.weights, want.weights, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_grid_start_lands_next_to_the_optimum_newton_finds(seed):
    """The starting grid evaluates the profile evidence k/2 log lam - N/2 log E(lam) - 1/2 sum log(lam + s): where
    the optimum is inside the grid, the start must be within one grid step of it (the profile is that function).
    Refined by the root of phi through three grid points it lands within a few hundredths, typically ~0.002 (a
    parabola through the profile alone: 0.02-0.2, median 0.05), which is what saves Newton an evaluation."""
    from workers.ranking.logme import spectrum as _spectrum_numpy
    from workers.ranking.logme_solvers import grid_start as _grid_start
    from workers.ranking.logme_solvers import solve as _solve

    rng = np.random.default_rng(seed)
    n, d, c = (200, 40, 5) if seed % 2 else (60, 80, 3)  # both spectrum modes (gram_d, gram_n)
    f, y = informative(n, d, c, seed=seed, scale=1.0)
    f *= 10.0 ** rng.uniform(-2, 2)
    sp, _ = _spectrum_numpy(f, onehot(y, c))
    centre = float(np.log(sp.s[sp.s > 0].mean()))
    lam, _, converged = _solve(sp, "newton", 1e-10, 1000)
    assert converged
    inside = np.abs(np.log(lam) - centre) < 15.0
    assert inside.any()
    start = _grid_start(sp, centre)
    error = np.abs(start - np.log(lam))[inside]
    assert np.all(error < 1.0)
    assert np.all(error < 0.1) and np.median(error) < 0.02


def wide_profile_maximum(f, yt, lo=-30.0, hi=30.0, points=241):
    """max over log(lam) in [lo, hi] of the Gaussian marginal likelihood with beta maximised in closed form
    (cov = (I + F F^T / lam) / beta, beta = N / y^T (I + F F^T / lam)^-1 y), per example."""
    n = len(yt)
    best = -np.inf
    for t in np.linspace(lo, hi, points):
        m = np.eye(n) + f @ f.T / np.exp(t)
        beta = n / (yt @ np.linalg.solve(m, yt))
        logdet = np.linalg.slogdet(m)[1] - n * np.log(beta)
        best = max(best, -0.5 * (logdet + n + n * np.log(2 * np.pi)))
    return best / n


@pytest.mark.parametrize("seed", [1, 16, 23, 26])
def test_finds_the_global_maximum_when_the_evidence_has_two(seed):
    """Nearly constant features with N < D (a random model on a few rows): the evidence in lam can have a local
    maximum near the mean eigenvalue and a higher one far from it. Starting Newton at the mean eigenvalue stopped
    at the lower one on these cases (0.005-0.14 nats per example too low); LogME is the maximum."""
    rng = np.random.default_rng(seed)
    n, d = 25, 32
    f = 1.0 + 0.1 * rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
    y = rng.integers(0, 3, n)
    res = logme(f, y, num_classes=3, compute_weights=False)
    for k in range(3):
        assert res.evidence_per_target[k] >= wide_profile_maximum(f, (y == k).astype(float)) - 1e-6


@pytest.mark.parametrize("n,d", [(300, 20), (20, 60)])
def test_many_classes_class_sum_path_equals_the_dense_targets(n, d):
    """From SPARSE_ONE_HOT_CLASSES classes on, F^T Y is formed as per-class row sums; the same one-hot rows given as
    multi-label targets take the dense product: the two must agree."""
    from workers.ranking.targets import SPARSE_ONE_HOT_CLASSES

    rng = np.random.default_rng(n)
    c = SPARSE_ONE_HOT_CLASSES + 4
    y = np.arange(n) % c  # every class present
    f = rng.normal(size=(n, d)) + 0.5 * rng.normal(size=(c, d))[y]
    sparse = logme(f, y, num_classes=c)
    dense = logme(f, np.eye(c)[y], task="multilabel")
    np.testing.assert_allclose(sparse.evidence_per_target, dense.evidence_per_target, rtol=1e-10)
    np.testing.assert_allclose(sparse.weights, dense.weights, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("n, d", [(40, 10), (30, 60)])
def test_leave_one_out_terms_match_the_gaussian_process_at_the_optimum(n: int, d: int) -> None:
    """Each row's LOO log predictive density, from LogME's eigen-data, against the textbook GP formulas with an
    explicit inverse of C = F F^T / alpha + I / beta (mean y_i - [C^-1 y]_i / [C^-1]_ii, variance 1 / [C^-1]_ii),
    both when N > D (F^T F route) and N < D (F F^T route)."""
    from workers.ranking.logme_variants import logme_loo_terms

    rng = np.random.default_rng(n + d)
    features = rng.standard_normal((n, d))
    labels = np.arange(n) % 3
    score, terms = logme_loo_terms(features, labels)
    fit = logme(features, labels, compute_weights=False)
    assert score == pytest.approx(fit.score, rel=1e-12)
    targets = np.eye(3)[labels]
    expected = []
    for t in range(3):
        inverse = np.linalg.inv(features @ features.T / fit.alpha[t] + np.eye(n) / fit.beta[t])
        variance = 1.0 / np.diag(inverse)
        residual = (inverse @ targets[:, t]) * variance
        expected.append(-0.5 * np.log(2 * np.pi * variance) - 0.5 * residual**2 / variance)
    np.testing.assert_allclose(terms, np.mean(expected, axis=0), rtol=1e-9, atol=1e-12)

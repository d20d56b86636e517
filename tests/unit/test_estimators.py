"""Transferability estimators against hand-worked cases, closed forms and definitional properties."""

import numpy as np
import pytest
import scipy.linalg as sla

from workers.ranking.estimators import (
    ESTIMATORS,
    gbc,
    gmm_posteriors,
    hscore,
    hscore_shrinkage,
    ledoit_wolf,
    leep,
    nce,
    nleep,
    score_estimator,
    sfda,
    transrate,
)

# 4 samples, 2 source classes: worked by hand below
THETA = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
Y4 = np.array([0, 1, 1, 0])


def test_leep_hand_worked():
    # joint P(y,z) = 1/4 * [[1.5, .5], [1, 1]]; P(z) = [2.5, 1.5]/4
    # P(y|z=0) = [.6, .4], P(y|z=1) = [1/3, 2/3]
    # EEP per sample: .6, .4, 2/3, .5*.6 + .5/3 = 7/15
    expected = np.mean(np.log([0.6, 0.4, 2 / 3, 7 / 15]))
    assert leep(THETA, Y4) == pytest.approx(expected, rel=1e-12)


def test_leep_perfect_one_to_one_head_is_zero():
    y = np.array([0, 1, 2, 2, 1, 0, 2])
    perm = np.array([3, 0, 1])  # target class k <-> source class perm[k] of 5
    probs = np.zeros((7, 5))
    probs[np.arange(7), perm[y]] = 1.0
    assert leep(probs, y) == pytest.approx(0.0, abs=1e-12)


def test_nce_hand_worked():
    # Z = argmax = [0, 0, 1, 0] (tie -> first); joint (y,z): (0,0)=2/4, (1,0)=1/4, (1,1)=1/4
    # H(Y|Z) = P(z=0) H(2/3, 1/3) + P(z=1) * 0
    h = 0.75 * -(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3))
    assert nce(THETA, Y4) == pytest.approx(-h, rel=1e-12)
    # a perfect head has no conditional entropy
    assert nce(np.eye(3)[[2, 0, 1, 1]], np.array([0, 1, 2, 2])) == pytest.approx(0.0, abs=1e-15)


def test_hscore_of_one_hot_features_is_c_minus_one():
    y = np.array([0, 1, 2, 0, 1, 2, 2, 0, 1, 1])
    # features = the class one-hot: E[f|y] = f, so H = tr(cov^+ cov) = rank(cov) = C - 1
    assert hscore(np.eye(3)[y], y) == pytest.approx(2.0, rel=1e-10)


def test_hscore_scalar_hand_case_and_affine_invariance():
    f = np.array([[0.0], [1.0], [3.0], [4.0]])
    y = np.array([0, 0, 1, 1])
    # class means .5, 3.5 (overall 2): cov(g) = 4 * 1.5^2 / 3 = 3; cov(f) = (4+1+1+4)/3 = 10/3
    assert hscore(f, y) == pytest.approx(3 / (10 / 3), rel=1e-12)
    rng = np.random.default_rng(0)
    g = rng.normal(size=(60, 4))
    yy = rng.integers(0, 3, 60)
    a = rng.normal(size=(4, 4))
    assert hscore(g @ a + 5.0, yy) == pytest.approx(hscore(g, yy), rel=1e-8)


def test_ledoit_wolf_matches_the_papers_formula():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 5)) * np.array([1, 2, 3, 0.5, 1])
    x -= x.mean(axis=0)
    n, p = x.shape
    s = x.T @ x / n
    m = np.trace(s) / p
    d2 = np.sum((s - m * np.eye(p)) ** 2) / p
    b2 = sum(np.sum((np.outer(r, r) - s) ** 2) for r in x) / p / n**2  # per-sample loop
    a = min(b2, d2) / d2
    cov, shrink = ledoit_wolf(x)
    assert shrink == pytest.approx(a, rel=1e-10)
    np.testing.assert_allclose(cov, (1 - a) * s + a * m * np.eye(p), rtol=1e-12)


def test_hscore_shrinkage_one_dimensional_has_no_shrinkage():
    f = np.array([[0.0], [1.0], [3.0], [4.0], [2.5]])
    y = np.array([0, 0, 1, 1, 1])
    # D = 1: S = mu I exactly, so a = 0 and the only change is the 1/N covariance of f
    n = 5
    assert hscore_shrinkage(f, y) == pytest.approx(hscore(f, y) * n / (n - 1), rel=1e-12)


def test_gbc_hand_case_and_separation():
    f = np.array([[0.0], [2.0], [4.0], [6.0]])
    y = np.array([0, 0, 1, 1])
    # means 1 and 5, variances 1 and 1: D_B = (5-1)^2 / 1 / 8 = 2 both ways
    assert gbc(f, y) == pytest.approx(-2 * np.exp(-2.0), rel=1e-12)
    assert gbc(f, y, gaussian_type="diagonal") == pytest.approx(-2 * np.exp(-2.0), rel=1e-12)
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 300)
    centers = np.eye(3) * 50.0
    far = centers[y] + rng.normal(size=(300, 3))
    near = centers[y] * 0.02 + rng.normal(size=(300, 3))
    assert gbc(far, y) > -1e-10
    assert gbc(near, y) < gbc(far, y) - 1.0


def test_transrate_hand_case():
    f = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    y = np.array([0, 0, 1, 1])
    eps = 1e-4
    # Z^T Z = diag(2, 2), n = 4: R(Z) = log(1 + 1/(2 eps)); each class: diag(2, 0), n = 2
    expected = np.log(1 + 1 / (2 * eps)) - 0.5 * np.log(1 + 1 / eps)
    assert transrate(f, y, eps) == pytest.approx(expected, rel=1e-12)
    # wide case (D > N uses the N x N Gram): equals the D x D definition
    rng = np.random.default_rng(3)
    g = rng.normal(size=(12, 30))
    yy = np.arange(12) % 3
    z = g - g.mean(axis=0)

    def rate(a):
        return 0.5 * np.linalg.slogdet(np.eye(30) + a.T @ a / (a.shape[0] * eps))[1]

    direct = rate(z) - np.mean([rate(z[yy == k]) for k in range(3)])
    assert transrate(g, yy, eps) == pytest.approx(direct, rel=1e-10)


def sfda_reference_port(x, y):
    """SFDA as in TencentARC/SFDA metrics.py (generalised eigenvectors, coef = means W W^T), with the
    3-step power iteration for the largest eigenvalue of Sw replaced by the exact one."""
    x = x.copy()
    classes = np.unique(y)
    c = len(classes)

    def fit_proba(x, shrinkage):
        n, d = x.shape
        priors = np.bincount(y) / n
        means = np.array([x[y == k].mean(axis=0) for k in classes])
        sw = sum(priors[k] * np.cov(x[y == k].T, bias=1) for k in classes)
        if shrinkage is None:
            shrinkage = max(np.exp(-5 * np.linalg.eigvalsh(sw)[-1]), 1e-10)
        st = np.cov(x.T, bias=1)
        st = (1 - shrinkage) * st + shrinkage * np.trace(st) / d * np.eye(d)
        sws = (1 - shrinkage) * sw + shrinkage * np.trace(sw) / d * np.eye(d)
        evals, evecs = sla.eigh(st - sws, sws)
        evecs = evecs[:, np.argsort(evals)[::-1]]
        coef = means @ evecs @ evecs.T
        intercept = -0.5 * np.diag(means @ coef.T) + np.log(priors)
        s = x @ coef.T + intercept
        p = np.exp(s - s.max(1, keepdims=True))
        return p / p.sum(1, keepdims=True), shrinkage, means

    prob, shrink, means = fit_proba(x, None)
    prob = np.exp(prob) / np.exp(prob).sum(1, keepdims=True)
    others = np.array([(means.sum(0) - means[k]) / (c - 1) for k in range(c)])
    for k in classes:
        idx = np.where(y == k)[0]
        p = prob[idx, k][:, None]
        x[idx] = p * x[idx] + (1 - p) * others[k]
    prob2, _, _ = fit_proba(x, shrink)
    return np.mean(prob2[np.arange(len(y)), y])


def test_sfda_matches_reference_structure_and_orders_separation():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 90)
    f = rng.normal(size=(90, 6)) + np.eye(3, 6)[y] * 1.5
    ours = sfda(f, y)
    assert ours == pytest.approx(sfda_reference_port(f, y), rel=1e-9)
    assert 0 < ours <= 1
    far = rng.normal(size=(90, 6)) + np.eye(3, 6)[y] * 20
    noise = rng.normal(size=(90, 6))
    assert sfda(far, y) > ours > sfda(noise, y)


def test_gmm_recovers_separated_blobs_and_nleep_orders_cases():
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1, 2], 40)
    x = np.eye(3)[y] * 30 + rng.normal(size=(120, 3))
    post = gmm_posteriors(x, 3, seed=0)
    hard = post.argmax(1)
    # each fitted component is pure
    for j in np.unique(hard):
        assert len(np.unique(y[hard == j])) == 1
    np.testing.assert_allclose(post.sum(1), 1.0)
    sep = nleep(x, y)
    assert sep == pytest.approx(0.0, abs=1e-6)  # pure components: P(y|z) = 1, log 1 = 0
    assert nleep(x, y) == sep  # deterministic
    shuffled = rng.permutation(y)
    assert nleep(x, shuffled) < sep - 0.3
    assert nleep(x, y, covariance="diag") == pytest.approx(0.0, abs=1e-6)


def test_registry_and_not_applicable():
    assert set(ESTIMATORS) == {"logme", "logme_projected", "ridge_loo", "hscore", "hscore_shrinkage", "nleep", "gbc",
                            "transrate", "sfda", "leep", "nce"}
    assert ESTIMATORS["leep"].needs_source_head and ESTIMATORS["nce"].needs_source_head
    assert not ESTIMATORS["hscore"].needs_source_head
    assert ESTIMATORS["logme"].applies_to("regression") and not ESTIMATORS["gbc"].applies_to("regression")
    rng = np.random.default_rng(6)
    f = rng.normal(size=(40, 4))
    y = rng.integers(0, 2, 40)
    assert score_estimator("leep", f, y, "classification") is None  # no source head
    assert score_estimator("leep", None, Y4, "classification", source_probs=THETA) == pytest.approx(leep(THETA, Y4))
    assert score_estimator("hscore", f, f[:, 0], "regression") is None
    assert score_estimator("hscore", f, np.zeros(40, int), "classification") is None  # one class
    assert score_estimator("hscore", f, y, "classification") == pytest.approx(hscore(f, y))
    assert isinstance(score_estimator("logme", f, f[:, 0], "regression"), float)
    with pytest.raises(KeyError):
        score_estimator("nope", f, y, "classification")


@pytest.mark.parametrize("metric", ["logme", "logme_projected", "ridge_loo", "hscore", "hscore_shrinkage", "nleep",
                                    "gbc", "transrate", "sfda"])
def test_scores_do_not_depend_on_the_units_of_the_features(metric: str) -> None:
    """A model's score must not change when its features are multiplied by a constant: a randomly initialised
    MobileNetV2 outputs features of size 1e-22, decoders can reach 1e3. Before score_estimator rescaled them, NLEEP
    raised LinAlgError at 1e8, TransRate went 70 -> 0 at 1e-22 and logme_projected 0.60 -> -0.59."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    features = rng.normal(size=(200, 64)) + np.eye(4)[labels] @ rng.normal(size=(4, 64))
    scores = [score_estimator(metric, features * scale, labels, "classification") for scale in (1.0, 1e-22, 1e-8, 1e8)]
    np.testing.assert_allclose(scores, scores[0], rtol=1e-9, atol=1e-12)


def test_projected_logme_projects_new_rows_with_its_own_intercept_value() -> None:
    from workers.ranking import logme_projected

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 80)
    features = 1e-3 * (rng.normal(size=(80, 40)) + np.eye(3)[labels] @ rng.normal(size=(3, 40)))
    fit = logme_projected(features, labels)
    assert fit.intercept_value == pytest.approx(np.sqrt(np.mean((features ** 2).sum(1))))
    # the chosen k coordinates reproduce the score through plain LogME on the projection
    from workers.ranking import logme

    assert logme(fit.project(features), labels).score == pytest.approx(fit.score, rel=1e-8)

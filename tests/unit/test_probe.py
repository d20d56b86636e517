"""ridge_loo against a brute-force leave-one-out: N separate ridge fits, written here without the module's algebra."""

import numpy as np
import pytest

from workers.ranking.probe import RELATIVE_STRENGTHS, quality_from_rows, ridge_loo, ridge_loo_rows


def brute_loo_predictions(f, y, lam):
    """Refit ridge with an unpenalised intercept on every N-1 rows (solve the normal equations directly)."""
    n, d = f.shape
    x = np.hstack([np.ones((n, 1)), f])
    penalty = lam * np.eye(d + 1)
    penalty[0, 0] = 0.0
    out = np.empty_like(y)
    for i in range(n):
        keep = np.arange(n) != i
        coef = np.linalg.solve(x[keep].T @ x[keep] + penalty, x[keep].T @ y[keep])
        out[i] = x[i] @ coef
    return out


def data(n, d, task, seed):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, d)) + 3.0  # far from centred: the intercept must be handled
    if task == "classification":
        labels = rng.integers(0, 3, n)
        f[:, 0] += labels
        return f, labels, np.eye(3)[labels]
    if task == "multilabel":
        labels = (rng.random((n, 3)) < 0.4).astype(int)
        f[:, :3] += 2 * labels
        return f, labels, labels.astype(float)
    labels = f[:, 0] + 0.5 * rng.normal(size=n)
    return f, labels, labels[:, None]


@pytest.mark.parametrize("task", ["classification", "multilabel", "regression"])
@pytest.mark.parametrize("n,d", [(40, 6), (12, 30)])  # N > D and N < D (the two spectral forms)
def test_matches_brute_force_leave_one_out(task, n, d):
    f, labels, y = data(n, d, task, seed=n + d)
    res = ridge_loo_rows(f, labels, task)
    pred = brute_loo_predictions(f, y, res.strength)
    if task == "classification":
        expected = np.mean(pred.argmax(1) == labels)
    elif task == "multilabel":
        p, t = pred > 0.5, y > 0.5
        tp, fp, fn = (p & t).sum(), (p & ~t).sum(), (~p & t).sum()
        expected = 2 * tp / (2 * tp + fp + fn)
    else:
        expected = 1 - np.sum((pred[:, 0] - labels) ** 2) / np.sum((labels - labels.mean()) ** 2)
    # the brute force solves ill-conditioned systems at small strengths
    assert res.score == pytest.approx(expected, abs=1e-7)


def test_picks_the_best_strength_of_its_grid():
    f, labels, y = data(30, 8, "regression", seed=3)
    res = ridge_loo_rows(f, labels, "regression")
    scale = np.linalg.eigvalsh((f - f.mean(0)).T @ (f - f.mean(0))).mean()
    scores = []
    for rel in RELATIVE_STRENGTHS:
        pred = brute_loo_predictions(f, y, rel * scale)
        scores.append(1 - np.sum((pred[:, 0] - labels) ** 2) / np.sum((labels - labels.mean()) ** 2))
    assert res.score == pytest.approx(max(scores), abs=1e-9)


def test_features_without_signal_score_at_chance_and_signal_scores_above():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    noise = rng.normal(size=(400, 20))
    signal = noise.copy()
    signal[:, 0] += 2.0 * labels
    assert ridge_loo(noise, labels) < 0.6
    assert ridge_loo(signal, labels) > 0.8


def test_quality_from_weighted_rows_counts_repeats():
    rows = np.array([1.0, 0.0, 1.0, 1.0])
    assert quality_from_rows(rows, "classification") == 0.75
    assert quality_from_rows(rows, "classification", np.array([0, 2, 1, 1])) == 0.5


@pytest.mark.parametrize("task", ["classification", "multilabel", "regression"])
def test_row_blocks_give_the_same_outcomes_as_one_block(task):
    f, labels, _ = data(50, 6, task, seed=7)
    whole = ridge_loo_rows(f, labels, task)
    blocks = ridge_loo_rows(f, labels, task, block_rows=7)
    assert blocks.score == whole.score and blocks.strength == whole.strength
    np.testing.assert_allclose(blocks.rows, whole.rows)

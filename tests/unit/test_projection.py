"""The feature map (workers.projection) and the tuned model's diagnostics (workers.tuning.evaluation)."""

from __future__ import annotations

import numpy as np

from workers.projection import MAX_POINTS, feature_map, pca_2d
from workers.tuning.evaluation import classification_metrics, evaluation_diagnostics


def test_pca_matches_the_covariance_eigenvectors() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)) * np.array([5.0, 2.0, 1.0, 0.5, 0.2, 0.1]) + 7.0
    points, explained = pca_2d(x)
    centred = x - x.mean(0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(centred, rowvar=False, bias=True))
    top = eigenvectors[:, ::-1][:, :2]
    # the same axes up to sign, the variance each explains, and the sign fixed by the largest loading
    assert np.allclose(np.abs(points), np.abs(centred @ top), atol=1e-8)
    assert np.allclose(explained, eigenvalues[::-1][:2] / eigenvalues.sum())
    assert np.allclose(points.mean(0), 0.0, atol=1e-9)
    # the sign follows the loadings, not the solver: the mirrored cloud is drawn mirrored
    assert np.allclose(pca_2d(-x)[0], -points, atol=1e-8)


def test_pca_of_degenerate_features() -> None:
    assert np.all(pca_2d(np.ones((10, 4)))[0] == 0.0)
    points, explained = pca_2d(np.arange(10.0).reshape(10, 1))  # one feature: the second axis is empty
    assert np.all(points[:, 1] == 0.0) and explained == [1.0, 0.0]
    assert pca_2d(np.zeros((0, 3)))[0].shape == (0, 2)


def test_feature_map_shares_a_stratified_subset_of_rows() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], [700, 290, 10])
    separable = rng.normal(size=(1000, 8)) + 6.0 * labels[:, None]
    noise = rng.normal(size=(1000, 16))
    found = feature_map({"good": separable, "bad": noise}, {"good": "Good", "bad": "Bad"}, labels,
                        "classification", ["a", "b", "c"])
    assert found["rows"] == MAX_POINTS and found["of_rows"] == 1000 and found["method"] == "pca"
    assert [m["model"] for m in found["models"]] == ["Good", "Bad"]
    assert all(len(m["points"]) == MAX_POINTS for m in found["models"])
    shown = found["labels"]
    assert set(shown) == {"a", "b", "c"} and shown.count("a") == 210  # 70% of 300: stratified
    # the good model's first axis separates the classes, the noise model's does not
    for model, separated in zip(found["models"], (True, False)):
        x = np.array(model["points"])[:, 0]
        means = [x[np.array(shown) == c].mean() for c in ("a", "b")]
        assert bool(abs(means[0] - means[1]) > 3.0) is separated


def test_feature_map_labels_for_other_tasks() -> None:
    x = np.random.default_rng(2).normal(size=(20, 3))
    multi = feature_map({"m": x}, {}, (np.arange(40).reshape(20, 2) % 3 == 0).astype(float), "multilabel",
                        ["p", "q"])
    assert multi["labels"][0] == "p" and "none" in multi["labels"] and multi["models"][0]["model"] == "m"
    regression = feature_map({"m": x}, {}, np.linspace(0, 1, 20), "regression", None)
    assert regression["labels"][0] == 0.0 and regression["labels"][-1] == 1.0


def test_classification_diagnostics_agree_with_the_metrics() -> None:
    rng = np.random.default_rng(3)
    logits, labels = rng.normal(size=(90, 3)), rng.integers(0, 3, 90)
    found = evaluation_diagnostics("classification", logits, labels)
    matrix = np.array(found["confusion_matrix"])
    assert matrix.sum() == 90 and np.trace(matrix) / 90 == classification_metrics(logits, labels)["accuracy"]
    assert np.array_equal(matrix.sum(1), np.bincount(labels, minlength=3))
    bins = found["reliability"]
    assert sum(b["count"] for b in bins) == 90 and all(b["lo"] < b["confidence"] <= b["hi"] for b in bins)
    ece = sum(b["count"] / 90 * abs(b["accuracy"] - b["confidence"]) for b in bins)
    assert 0.0 <= ece <= 1.0


def test_regression_diagnostics_keep_at_most_300_pairs() -> None:
    y = np.arange(1000.0)
    found = evaluation_diagnostics("regression", (y + 1.0)[:, None], y)
    pairs = found["predicted_vs_true"]
    assert len(pairs) == 300 and pairs[0] == [0.0, 1.0] and pairs[-1] == [999.0, 1000.0]

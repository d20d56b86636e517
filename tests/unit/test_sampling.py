"""Row sampling for ranking and the train/validation split for tuning."""

import numpy as np
import pytest

from workers.pipeline import ranking_targets, sample_rows
from workers.ranking import logme, prior_only_evidence
from workers.tuning.selection import split_rows


def test_stratified_sample_keeps_class_proportions_and_is_reproducible() -> None:
    labels = np.array([0] * 600 + [1] * 300 + [2] * 100)
    rows = sample_rows(labels, "classification", 100, seed=3)
    assert np.array_equal(rows, sample_rows(labels, "classification", 100, seed=3))
    assert len(set(rows)) == len(rows) == 100
    assert np.bincount(labels[rows]).tolist() == [60, 30, 10]
    assert np.array_equal(sample_rows(labels, "classification", None, seed=0), np.arange(1000))


def test_split_is_disjoint_stratified_and_covers_every_row() -> None:
    labels = np.array([0] * 50 + [1] * 20 + [2] * 2)
    train, val = split_rows(labels, "classification", 0.2, seed=0)
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(labels)
    assert np.bincount(labels[val]).tolist() == [10, 4, 1]  # every class validated, every class trained
    assert np.bincount(labels[train]).tolist() == [40, 16, 1]
    reg_train, reg_val = split_rows(np.linspace(0, 1, 40), "regression", 0.25, seed=1)
    assert len(reg_val) == 10 and len(reg_train) == 30


def test_repeated_examples_are_read_once_and_logme_counts_coinciding_rows_once(tmp_path) -> None:
    """Copies of a text with fewer distinct rows than feature dimensions: along the direction that tells the copies
    apart every target that agrees on them has zero residual, and the evidence would grow without bound as the noise
    variance goes to 0 (before the fix: lam at the solver's clip and a score that was an artefact of it). LogME now
    drops such directions (the copies count once), and the pipeline reads each text once anyway."""
    from workers.pipeline import DatasetSpec, distinct_examples, load_dataset
    from workers.ranking import logme

    rng = np.random.default_rng(0)
    n, d = 60, 200
    labels = rng.integers(0, 3, n)
    features = rng.normal(size=(n, d))
    features[:, :3] += np.eye(3)[labels]
    texts = [f"text {i}" for i in range(n)]
    features[1], labels[1], texts[1] = features[0], labels[0], texts[0]  # the same example twice
    texts.append("text 5")  # the same text as row 5 under another label: one-vs-rest targets other than those two
    # agree on both copies, so it is read once too (with its first label)
    labels = np.append(labels, (labels[5] + 1) % 3)
    features = np.vstack([features, features[5]])

    keep = distinct_examples(texts)
    assert keep.tolist() == [0, *range(2, n)]
    repeated = logme(features, labels)
    distinct = logme(features[keep], labels[keep])
    for fit in (repeated, distinct):
        assert (fit.alpha / fit.beta).min() > 1e-6  # an interior optimum: bounded evidence
    assert repeated.score == pytest.approx(distinct.score, abs=0.05)

    # load_dataset (what rank and tune jobs read) applies it
    from service.datasets import ParsedDataset, write_normalized

    path = tmp_path / "normalized.parquet"
    names = ["a", "b", "c"]
    write_normalized(ParsedDataset(examples=texts, labels=[int(y) for y in labels], label_names=names,
                                   class_counts=None, rows=len(texts)), "classification", path)
    read_texts, read_labels = load_dataset(DatasetSpec(path, "classification", names))
    assert read_texts == [texts[i] for i in keep]
    assert read_labels.tolist() == labels[keep].tolist()


def test_regression_targets_are_standardised_so_a_target_offset_cannot_decide_the_ranking() -> None:
    """LogME fits no bias: on a raw target far from zero, features that carry a large constant component win
    over features that explain the target, and every model falls below the label-mean baseline."""
    rng = np.random.default_rng(0)
    n = 300
    signal = rng.normal(size=n)
    y = 50.0 + 2.0 * signal + 0.5 * rng.normal(size=n)
    explains = np.column_stack([signal, rng.normal(size=(n, 7))])  # 8-d, centred, carries the signal
    constant = np.column_stack([np.full(n, 10.0) + 0.01 * rng.normal(size=n), rng.normal(size=(n, 7))])
    raw = {name: logme(f, y, "regression").score for name, f in [("explains", explains), ("constant", constant)]}
    assert raw["constant"] > raw["explains"]  # the defect: the offset decides
    assert raw["explains"] < prior_only_evidence(y, "regression")

    z = ranking_targets(y, "regression")
    assert abs(z.mean()) < 1e-12 and abs(z.std() - 1.0) < 1e-12
    fair = {name: logme(f, z, "regression").score for name, f in [("explains", explains), ("constant", constant)]}
    assert fair["explains"] > prior_only_evidence(z, "regression") > fair["constant"] - 0.05
    assert fair["explains"] > fair["constant"]
    # shifting or rescaling the uploaded target changes nothing any more
    assert np.allclose(ranking_targets(3.0 * y - 7.0, "regression"), z)
    labels = np.array([0, 1, 1, 2])
    assert ranking_targets(labels, "classification") is labels
    with pytest.raises(ValueError, match="constant"):
        ranking_targets(np.full(5, 1.5), "regression")


def test_multilabel_targets_drop_labels_that_never_occur() -> None:
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=float)
    assert ranking_targets(y, "multilabel").tolist() == [[1, 0], [0, 1], [1, 1]]
    full = np.array([[1, 0], [0, 1]], dtype=float)
    assert ranking_targets(full, "multilabel") is full
    with pytest.raises(ValueError, match="no label"):
        ranking_targets(np.zeros((4, 2)), "multilabel")

"""Row sampling for ranking and the train/validation split for tuning."""

import numpy as np

from workers.pipeline import sample_rows
from workers.tune_runner import split_rows


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

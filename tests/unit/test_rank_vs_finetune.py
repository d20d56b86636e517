"""The pieces of benchmarks/rank_vs_finetune.py that turn scores into claims: agreement statistics and the probe."""

import numpy as np
import pytest

from benchmarks.rank_vs_finetune import agreement, linear_probe, subsample


def test_agreement_of_the_same_order_is_perfect_and_of_the_reverse_is_not():
    truth = [0.9, 0.7, 0.8, 0.5, 0.6]
    same = agreement([5.0, 1.0, 3.0, -2.0, 0.0], truth)
    assert same["weightedtau"] == pytest.approx(1.0) and same["kendall"] == pytest.approx(1.0)
    assert same["rel1"] == 1.0 and same["top1"] == 1.0
    reverse = agreement([-t for t in truth], truth)
    assert reverse["weightedtau"] == pytest.approx(-1.0)
    assert reverse["rel1"] == pytest.approx(0.5 / 0.9) and reverse["top1"] == 0.0
    # scores that cannot tell models apart claim nothing, not a lucky top-1
    assert agreement([4.0, 4.0, 4.0, 4.0, 4.0], truth) == {"weightedtau": None, "pearson": None, "kendall": None,
                                                          "rel1": None, "top1": None}


def test_linear_probe_separates_separable_classes_and_not_noise():
    rng = np.random.default_rng(0)
    y = np.arange(200) % 4
    signal = np.eye(4)[y] @ rng.normal(size=(4, 16)) * 3 + rng.normal(size=(200, 16))
    acc, _ = linear_probe("classification", signal[:100], y[:100], signal[100:], y[100:])
    assert acc > 0.95
    noise = rng.normal(size=(200, 16))
    acc_noise, _ = linear_probe("classification", noise[:100], y[:100], noise[100:], y[100:])
    assert acc_noise < 0.45
    x = rng.normal(size=(200, 8))
    target = (x @ rng.normal(size=8) + 0.1 * rng.normal(size=200)).astype(np.float32)
    r2, _ = linear_probe("regression", x[:100], target[:100], x[100:], target[100:])
    assert r2 > 0.95


def test_subsample_is_stratified_and_keeps_every_class():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    picked = subsample(labels, "classification", 100, seed=0)
    counts = np.bincount(labels[picked], minlength=3)
    assert counts[0] == 90 and counts[1] == 9 and counts[2] == 2
    assert len(np.unique(picked)) == len(picked)

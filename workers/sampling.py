"""Stratified row sampling: the one quota rule, the samples and splits drawn with it, and nested orders.

Every sampler in the project is a thin call to these: the rank pipeline's `sample_size` (pipeline.sample_rows), the
tune phase's train/validation split and B-Tuning's trial split (tuning.selection.split_rows), successive halving's
growing samples (nested_order), and the benchmarks' and the demo's data writers.

The quota rule (`class_quotas`): a sample of `size` rows takes from each class its share of `size` by the largest
remainder method (each class the floor of count * size / n, the rows left over to the classes with the largest
remainders, ties to the earlier class), so the quotas add up to `size`; a caller may then ask for at least `minimum`
rows of each class (a class LogME must see, a class every split validates) and for `keep` rows of each class left
out (a split that trains on every class). Rows are drawn per class as the head of a seeded permutation of its rows.

numpy only: the API process may import this.
"""

from __future__ import annotations

import numpy as np

Seed = int | np.random.Generator


def class_quotas(counts: np.ndarray | list[int], size: int, *, minimum: int = 0, keep: int = 0) -> np.ndarray:
    """Rows per class for a sample of `size` of the rows counted in `counts` (see the module docstring): the largest
    remainder apportionment of `size`, raised to `minimum`, capped at `count - keep` (and never below 0)."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if n == 0:
        return np.zeros_like(counts)
    size = min(max(int(size), 0), n)
    exact = counts * size  # integers throughout: the quota of a class is exact // n, its remainder exact % n
    quotas = exact // n
    spare = size - int(quotas.sum())
    quotas[np.argsort(-(exact % n), kind="stable")[:spare]] += 1
    return np.maximum(np.minimum(np.maximum(quotas, minimum), counts - keep), 0)


def _strata(labels: np.ndarray, stratify: bool) -> np.ndarray:
    """Class ids 0..C-1 of each row (one class for all rows when not stratified)."""
    n = len(labels)
    if not stratify:
        return np.zeros(n, dtype=np.int64)
    return np.unique(np.asarray(labels), return_inverse=True)[1].reshape(n)


def stratified_split(labels: np.ndarray, size: int, seed: Seed, *, stratify: bool = True, minimum: int = 0,
                     keep: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rest), both sorted: `size` rows drawn by class (`class_quotas`; stratify False: one class, a plain
    random sample), and all the other rows. labels: (N,) class labels (any labels when not stratified)."""
    strata = _strata(labels, stratify)
    rng = np.random.default_rng(seed)  # a Generator passed in is used as it is
    counts = np.bincount(strata) if len(strata) else np.zeros(0, dtype=np.int64)
    quotas = class_quotas(counts, size, minimum=minimum, keep=keep)
    picked = [rng.permutation(np.flatnonzero(strata == k))[:q] for k, q in enumerate(quotas)]
    chosen = np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)
    return chosen.astype(np.int64), np.setdiff1d(np.arange(len(strata)), chosen)


def stratified_sample(labels: np.ndarray, size: int | None, seed: Seed, *, stratify: bool = True, minimum: int = 0,
                      shuffle: bool = False) -> np.ndarray:
    """Row indices of a stratified sample of `size` rows (`stratified_split`'s chosen rows); every row when size is
    None or at least the number of rows. Sorted, or with shuffle in a random order (a file written class by class
    would otherwise group its rows)."""
    n = len(labels)
    rng = np.random.default_rng(seed)
    if size is None or size >= n:
        return rng.permutation(n) if shuffle else np.arange(n)
    chosen, _ = stratified_split(labels, size, rng, stratify=stratify, minimum=minimum)
    return rng.permutation(chosen) if shuffle else chosen


def nested_order(labels: np.ndarray, seed: int, *, stratify: bool = True) -> np.ndarray:
    """A permutation of all rows whose every prefix is a (near) stratified sample, for samples that must be nested.

    Each class is shuffled and its j-th member placed at fractional position (j + 0.5) / count, so a prefix of s
    rows holds each class in proportion to within one row; the first member of every class comes first, so any
    prefix of at least C rows has every class (LogME is undefined for an empty class). stratify False: a plain random
    permutation. Not `class_quotas`: largest remainder quotas of a growing size can shrink a class (the Alabama
    paradox), and nested samples need each prefix to contain the last, which these fractional positions (a divisor
    method) guarantee.
    """
    n = len(labels)
    rng = np.random.default_rng(seed)
    if not stratify:
        return rng.permutation(n)
    keys = np.empty(n)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        position = (np.arange(len(members)) + 0.5) / len(members)
        position[0] = -1.0  # one of each class up front
        keys[members] = position
    tie_break = rng.random(n)  # equal fractions (e.g. classes of equal size) in random class order
    return np.lexsort((tie_break, keys))

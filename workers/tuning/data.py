"""The examples a tuning run reads, and their labels checked against the task: numpy only, no torch."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from workers.pipeline import Examples


class ExampleDataset(NamedTuple):
    """examples and labels: (N,) ints for classification, (N, C) 0/1 for multilabel, (N,) or (N, T) floats for
    regression. `examples` are texts, text pairs (tuples, read as the tokenizer's pair), or encoded image files
    (bytes): the model is then an image classifier."""

    examples: Examples
    labels: np.ndarray


def holds_images(data: ExampleDataset) -> bool:
    return len(data.examples) > 0 and isinstance(data.examples[0], (bytes, bytearray))


def check_labels(task: str, data: ExampleDataset, num_labels: int | None, where: str) -> np.ndarray:
    """The labels of `data` as the loop trains on them (int64 class ids, float32 0/1 rows, float32 (N, T) targets);
    ValueError, naming `where`, when they do not fit the task."""
    examples, labels = data
    y = np.asarray(labels)
    if len(examples) != len(y):
        raise ValueError(f"{where}: {len(examples)} examples but {len(y)} labels")
    if task == "classification":
        if y.ndim != 1 or (y.size and not np.all(np.mod(y, 1) == 0)):
            raise ValueError(f"{where}: classification labels must be integers of shape (N,)")
        y = y.astype(np.int64)
        if y.size and (y.min() < 0 or (num_labels is not None and y.max() >= num_labels)):
            raise ValueError(f"{where}: labels must be in 0..{(num_labels or 0) - 1}")
    elif task == "multilabel":
        if y.ndim != 2 or not np.all((y == 0) | (y == 1)):
            raise ValueError(f"{where}: multilabel labels must be 0/1 of shape (N, C)")
        y = y.astype(np.float32)
    else:
        y = y.astype(np.float32)
        if y.ndim == 1:
            y = y[:, None]
        if y.ndim != 2 or not np.all(np.isfinite(y)):
            raise ValueError(f"{where}: regression targets must be finite, shape (N,) or (N, T)")
    return y


def label_count(task: str, labels: np.ndarray, label_names: list[str] | None) -> int:
    """Outputs of the model's head: targets for regression, labels for multilabel, classes for classification
    (the names given, or the largest class id + 1)."""
    if task == "regression":
        y = np.asarray(labels)
        return 1 if y.ndim == 1 else int(y.shape[1])
    if task == "multilabel":
        return int(np.asarray(labels).shape[1])
    return len(label_names) if label_names else int(np.max(labels)) + 1

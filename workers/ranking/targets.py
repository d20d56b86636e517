"""Labels as the target matrix a linear model on features fits: one column per class (one-hot), per label (0/1)
or per regression output. For many classes the one-hot matrix is kept sparse, as Y^T (`one_hot_transposed`)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

Task = Literal["classification", "multilabel", "regression"]


def class_codes(labels: Any, num_classes: int | None = None) -> tuple[np.ndarray, int]:
    """Checked integer class ids (N,) and the number of classes C."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"classification labels must be shape (N,), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.mod(y, 1) == 0):
            raise ValueError("classification labels must be integers 0..C-1")
        y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError("classification labels must be >= 0")
    c = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if y.size and y.max() >= c:
        raise ValueError(f"label {int(y.max())} >= num_classes {c}")
    return y, c


# From this many classes on, F^T Y for one-hot Y is formed as per-class row sums (a sparse product, N*D additions)
# instead of a dense N x D x C matrix product; below it the dense product is as fast.
SPARSE_ONE_HOT_CLASSES = 8


def one_hot_transposed(codes: np.ndarray, num_classes: int) -> Any:
    """Y^T as a (C, N) CSR matrix: Y^T A is the per-class sum of A's rows."""
    import scipy.sparse as sps

    n = codes.shape[0]
    return sps.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(num_classes, n))


def transpose_times(a: np.ndarray, y: Any) -> np.ndarray:
    """A^T Y for dense targets Y (N, T), or for Y given as a sparse Y^T (T, N)."""
    if isinstance(y, np.ndarray):
        return a.T @ y
    return np.asarray((y @ a).T)


def make_targets(labels: Any, task: str = "classification", num_classes: int | None = None) -> np.ndarray:
    """Turn labels into the (N, T) float64 target matrix LogME fits, one column per target."""
    y = np.asarray(labels)
    if task == "classification":
        y, c = class_codes(y, num_classes)
        out = np.zeros((y.shape[0], c), dtype=np.float64)
        out[np.arange(y.shape[0]), y] = 1.0
        return out
    if task == "multilabel":
        if y.ndim != 2:
            raise ValueError(f"multilabel labels must be shape (N, C), got {y.shape}")
        out = np.asarray(y, dtype=np.float64)
        if not np.all((out == 0) | (out == 1)):
            raise ValueError("multilabel labels must be 0/1")
        return np.ascontiguousarray(out)
    if task == "regression":
        out = np.asarray(y, dtype=np.float64)
        if out.ndim == 1:
            out = out[:, None]
        if out.ndim != 2:
            raise ValueError(f"regression targets must be (N,) or (N, T), got {y.shape}")
        if not np.all(np.isfinite(out)):
            raise ValueError("regression targets contain NaN or inf")
        return np.ascontiguousarray(out)
    raise ValueError(f"unknown task {task!r}")

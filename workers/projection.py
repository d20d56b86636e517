"""A 2-D map of each candidate's features on the ranked rows: PCA by numpy's SVD, on one shared subset of rows,
so the dashboard can show whether a model's features separate the labels. Pure numpy: arrays in, plain data out."""

from __future__ import annotations

from typing import Any

import numpy as np

from workers.sampling import stratified_sample

# Points per model: enough to see clusters, small enough to store with the job (about 8 KB of JSON per model).
MAX_POINTS = 300
_DIGITS = 4  # coordinates are rounded: the map is for the eye, not for computation


def pca_2d(features: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """The rows of `features` (N×D) on their first two principal components (N×2, centred), and the share of the
    variance each component explains. A component the features lack (D < 2, or rank < 2) is zero."""
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    points = np.zeros((x.shape[0], 2))
    total = float((x ** 2).sum())
    if x.shape[0] == 0 or total <= 0.0:
        return points, [0.0, 0.0]
    # economy SVD: u * s are the scores; each component's sign is fixed by its largest loading so the map of
    # the same features is drawn the same way on every run
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(2, s.size)
    signs = np.sign(vt[np.arange(k), np.abs(vt[:k]).argmax(axis=1)])
    signs[signs == 0] = 1.0
    points[:, :k] = u[:, :k] * s[:k] * signs
    explained = [float(s[i] ** 2 / total) if i < k else 0.0 for i in range(2)]
    return points, explained


def map_rows(labels: np.ndarray, task: str, max_points: int = MAX_POINTS, seed: int = 0) -> np.ndarray:
    """The rows the map shows (sorted): all of them up to max_points, else a sample stratified by class."""
    return stratified_sample(labels, max_points, seed, stratify=task == "classification", minimum=1)


def point_labels(labels: np.ndarray, task: str, label_names: list[str] | None) -> list[Any]:
    """What colours each point: the class name; for multi-label rows their labels joined with '+' ('none' when
    the row has none); for regression the target value."""
    names = list(label_names or [])

    def name(index: int) -> str:
        return names[index] if index < len(names) else str(index)

    if task == "classification":
        return [name(int(v)) for v in labels]
    if task == "multilabel":
        return ["+".join(name(int(i)) for i in np.flatnonzero(row)) or "none" for row in np.asarray(labels)]
    return [round(float(v), _DIGITS) for v in np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)[:, 0]]


def feature_map(features_by_model: dict[str, np.ndarray], names: dict[str, str], labels: np.ndarray, task: str,
                label_names: list[str] | None, *, max_points: int = MAX_POINTS, seed: int = 0) -> dict[str, Any]:
    """Each model's features (rows in the order of `labels`) projected to 2-D on the same subset of rows.

    {"method": "pca", "rows": n shown, "of_rows": n ranked, "task", "labels": one per point (see point_labels),
     "models": [{"model_id", "model", "points": [[x, y], ...], "explained_variance": [pc1, pc2]}]}"""
    rows = map_rows(labels, task, max_points, seed)
    models = []
    for model_id, features in features_by_model.items():
        points, explained = pca_2d(np.asarray(features)[rows])
        models.append({"model_id": model_id, "model": names.get(model_id, model_id),
                       "points": np.round(points, _DIGITS).tolist(),
                       "explained_variance": [round(v, _DIGITS) for v in explained]})
    return {"method": "pca", "rows": int(len(rows)), "of_rows": int(len(labels)), "task": task,
            "labels": point_labels(np.asarray(labels)[rows], task, label_names), "models": models}

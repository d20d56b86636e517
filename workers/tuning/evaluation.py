"""How well a tuned model does on held-out rows, from its raw outputs (accuracy, F1, calibration, RMSE...): plain
numpy, no torch. ("Metrics" in the API are the ranking estimators: workers.ranking.)"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """sum_b n_b/N * |accuracy_b - mean confidence_b| over equal-width bins (0, 1/bins], ... (Guo et al. 2017)."""
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=np.float64).ravel()
    if confidence.size == 0:
        return float("nan")
    # bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 goes to the first bin
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(total)


def _f1_per_class(y_true: np.ndarray, y_pred: np.ndarray, classes: np.ndarray) -> np.ndarray:
    out = []
    for c in classes:
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        out.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return np.asarray(out, dtype=np.float64)


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """accuracy, macro-F1 (over the classes present in labels or predictions, as scikit-learn), ECE (15 bins)."""
    probs = softmax(np.asarray(logits, dtype=np.float64))
    pred = probs.argmax(1)
    labels = np.asarray(labels).astype(np.int64)
    classes = np.union1d(labels, pred)
    return {
        "accuracy": float(np.mean(pred == labels)),
        "macro_f1": float(_f1_per_class(labels, pred, classes).mean()),
        "ece": expected_calibration_error(probs.max(1), pred == labels),
    }


def multilabel_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """micro- and macro-F1 at probability 0.5; ECE over every (example, label) decision, confidence max(p, 1-p)."""
    p = sigmoid(np.asarray(logits, dtype=np.float64))
    pred = p > 0.5
    y = np.asarray(labels) > 0.5
    tp = (pred & y).sum(0)
    fp = (pred & ~y).sum(0)
    fn = (~pred & y).sum(0)
    denom = 2 * tp + fp + fn
    per_label = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    micro_denom = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "micro_f1": float(2 * tp.sum() / micro_denom) if micro_denom else 0.0,
        "macro_f1": float(per_label.mean()),
        "ece": expected_calibration_error(np.maximum(p, 1 - p), pred == y),
    }


def regression_metrics(outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """RMSE over all outputs and R^2 = 1 - SSE/SST averaged over output columns."""
    out = np.asarray(outputs, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64).reshape(out.shape)
    rmse = float(np.sqrt(np.mean((out - y) ** 2)))
    sst = ((y - y.mean(0)) ** 2).sum(0)
    sse = ((y - out) ** 2).sum(0)
    r2 = np.where(sst > 0, 1 - sse / np.where(sst > 0, sst, 1), np.nan)
    return {"rmse": rmse, "r2": float(np.nanmean(r2)) if np.any(np.isfinite(r2)) else float("nan")}


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of scores where `positive` rows should score higher: P(s+ > s-) + P(s+ = s-)/2,
    from the ranks of the pooled scores (ties get their average rank; Mann-Whitney U / (n+ n-))."""
    positive = np.asarray(positive, dtype=np.float64).ravel()
    negative = np.asarray(negative, dtype=np.float64).ravel()
    if positive.size == 0 or negative.size == 0:
        return float("nan")
    pooled = np.concatenate([positive, negative])
    order = np.argsort(pooled, kind="mergesort")
    ranks = np.empty(pooled.size, dtype=np.float64)
    sorted_scores = pooled[order]
    # average rank (1-based) of each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], pooled.size]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    u = ranks[:positive.size].sum() - positive.size * (positive.size + 1) / 2.0
    return float(u / (positive.size * negative.size))


def uncertainty(logits: np.ndarray) -> np.ndarray:
    """1 - max softmax probability per row: the predictive uncertainty the OOD score ranks by."""
    return 1.0 - softmax(np.asarray(logits, dtype=np.float64)).max(1)


def ood_auroc(in_logits: np.ndarray, out_logits: np.ndarray) -> float:
    """How well the uncertainty tells out-of-distribution rows (positives) from in-distribution ones: 0.5 is
    chance, 1 separates them."""
    return auroc(uncertainty(out_logits), uncertainty(in_logits))


def task_metrics(task: str, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    if task == "classification":
        return classification_metrics(outputs, labels)
    if task == "multilabel":
        return multilabel_metrics(outputs, labels)
    if task == "regression":
        return regression_metrics(outputs, labels)
    raise ValueError(f"unknown task {task!r}")


MAIN_METRIC = {"classification": "accuracy", "multilabel": "micro_f1", "regression": "rmse"}


RELIABILITY_BINS = 10
MAX_PREDICTION_POINTS = 300  # regression: predicted-vs-true pairs kept for the plot


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = RELIABILITY_BINS
                     ) -> list[dict[str, float | int]]:
    """The reliability diagram's bars: per equal-width confidence bin (lo, hi], its rows, mean confidence and
    accuracy (the binning of expected_calibration_error); empty bins are left out."""
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=np.float64).ravel()
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    out: list[dict[str, float | int]] = []
    for b in range(bins):
        sel = which == b
        if sel.any():
            out.append({"lo": b / bins, "hi": (b + 1) / bins, "count": int(sel.sum()),
                        "confidence": float(confidence[sel].mean()), "accuracy": float(correct[sel].mean())})
    return out


def evaluation_diagnostics(task: str, outputs: np.ndarray, labels: np.ndarray) -> dict[str, object]:
    """What the dashboard plots of the last validation pass: classification the confusion matrix (rows the true
    class, columns the predicted, in label-index order) and the reliability bins; multi-label the reliability bins
    of every (row, label) decision; regression up to MAX_PREDICTION_POINTS (true, predicted) pairs of the first
    target."""
    out = np.asarray(outputs, dtype=np.float64)
    if task == "classification":
        probs = softmax(out)
        pred, true = probs.argmax(1), np.asarray(labels).astype(np.int64)
        classes = out.shape[1]
        matrix = np.zeros((classes, classes), dtype=np.int64)
        np.add.at(matrix, (true, pred), 1)
        return {"confusion_matrix": matrix.tolist(), "reliability": reliability_bins(probs.max(1), pred == true)}
    if task == "multilabel":
        p = sigmoid(out)
        return {"reliability": reliability_bins(np.maximum(p, 1 - p), (p > 0.5) == (np.asarray(labels) > 0.5))}
    y = np.asarray(labels, dtype=np.float64).reshape(out.shape)
    keep = np.linspace(0, len(y) - 1, min(len(y), MAX_PREDICTION_POINTS)).round().astype(int) if len(y) else []
    return {"predicted_vs_true": [[round(float(y[i, 0]), 6), round(float(out[i, 0]), 6)] for i in keep]}

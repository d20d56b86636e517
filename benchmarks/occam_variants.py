"""Which pretrained model does the random model beat, and does a bias column change it? (LogME's Occam failure)

Companion to benchmarks/occam.py, for the data where the failure happens (kaomoji): per sample size, the share of
sample seeds in which the randomly initialised 32-d model scores above each pretrained model, for
  plain         LogME as published and as ranked (no bias column),
  bias          a column of ones appended to every model's features, so fitting the class prior costs every
                model the same (`logme(..., add_bias=True)`),
  centred+bias  features centred over the sample, plus the bias column,
  conditional   the bias column, LogME's alpha and beta from all rows, then the evidence of a random half of the rows
                given the other half, per example, averaged over 10 splits: the conditional marginal likelihood of
                Lotfi et al. (ICML 2022), which does not charge a model for what it must learn from the first half.
                If the Occam charge were what misorders the models, this would order them;
  ridge_loo     leave-one-out accuracy of a ridge probe (workers.ranking.probe): the held-out accuracy that
                fine-tuning rewards, with no Gaussian likelihood.
It also prints how constant each model's features are (||mean f|| / mean ||f||): a model whose features are
nearly one vector is, for LogME, nearly the label-prior baseline.

    python -m benchmarks.data.kaomoji --out /tmp/kaomoji5.csv
    python -m benchmarks.occam_variants --hub HUB --data /tmp/kaomoji5.csv --max-length 32 --seeds 10
HUB: a folder built by `python -m demo.prepare_hub --out HUB --rows 0 --models
all-MiniLM-L6-v2,paraphrase-MiniLM-L3-v2,all-mpnet-base-v2,random-init-32d`.
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.occam import read_text_label_csv
from workers.features import extract_features
from workers.pipeline import sample_rows
from workers.ranking import logme, prior_only_evidence, ridge_loo

RANDOM = "random-init-32d"
LOG_2PI = float(np.log(2 * np.pi))


def log_evidence(f: np.ndarray, y: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """log N(y_t; 0, I / beta_t + F F^T / alpha_t) for every target column t, via the smaller Gram matrix."""
    n, d = f.shape
    if n >= d:
        s, v = np.linalg.eigh(f.T @ f)
        p2 = (v.T @ (f.T @ y)) ** 2  # (D, T)
        rank_gap = 0
    else:
        s, u = np.linalg.eigh(f @ f.T)
        p2 = (u.T @ y) ** 2  # (N, T)
        rank_gap = d - n  # A = alpha I + beta F^T F has d - n more eigenvalues equal to alpha
    s = np.maximum(s, 0.0)
    lam = alpha / beta
    shifted = lam[None, :] + s[:, None]  # (k, T)
    if n >= d:
        e = (y * y).sum(0) - (p2 / shifted).sum(0)  # ||y - F m||^2 + lam ||m||^2
    else:
        e = lam * (p2 / shifted).sum(0)
    logdet = (np.log(alpha[None, :] + beta[None, :] * s[:, None])).sum(0) + rank_gap * np.log(alpha)
    return 0.5 * d * np.log(alpha) + 0.5 * n * np.log(beta) - 0.5 * logdet - 0.5 * beta * e - 0.5 * n * LOG_2PI


def conditional_evidence(f: np.ndarray, y: np.ndarray, classes: int, splits: int = 10, seed: int = 0) -> float:
    """Mean over targets and random halves B of log p(y_B | y_A) / |B|, with LogME's alpha, beta from all rows."""
    f1 = np.hstack([f, np.ones((f.shape[0], 1))])
    fit = logme(f1, y, num_classes=classes, compute_weights=False)
    targets = np.eye(classes)[y]
    full = log_evidence(f1, targets, fit.alpha, fit.beta)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(splits):
        half = rng.permutation(len(y))[: len(y) // 2]
        given = log_evidence(f1[half], targets[half], fit.alpha, fit.beta)
        values.append((full - given).mean() / (len(y) - len(half)))
    return float(np.mean(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hub", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="CSV with text,label columns")
    parser.add_argument("--models", default="all-MiniLM-L6-v2,paraphrase-MiniLM-L3-v2,all-mpnet-base-v2")
    parser.add_argument("--sizes", default="25,50,100,200,400")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()

    texts, names, labels = read_text_label_csv(args.data)
    classes = len(names)
    pretrained = args.models.split(",")
    features = {m: extract_features(args.hub / m, texts, max_length=args.max_length).features.astype(np.float64)
                for m in pretrained + [RANDOM]}

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.data.name}, {len(texts)} distinct texts, "
          f"{classes} classes; {args.seeds} sample seeds per size\n")
    print("| model | dim | ‖mean f‖ / mean ‖f‖ |")
    print("|---|---|---|")
    for m, f in features.items():
        print(f"| {m} | {f.shape[1]} | {np.linalg.norm(f.mean(0)) / np.linalg.norm(f, axis=1).mean():.2f} |")

    variants: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "plain": lambda f, y: logme(f, y, num_classes=classes, compute_weights=False).score,
        "bias": lambda f, y: logme(f, y, num_classes=classes, compute_weights=False, add_bias=True).score,
        "centred+bias": lambda f, y: logme(f - f.mean(0), y, num_classes=classes, compute_weights=False,
                                           add_bias=True).score,
        "conditional": lambda f, y: conditional_evidence(f, y, classes),
        "ridge_loo": lambda f, y: ridge_loo(f, y),
    }
    print("\nShare of seeds in which the random model scores above each pretrained model, and mean scores:")
    shares_header = " | ".join(f"random > {m}" for m in pretrained)
    print(f"| N | prior-only | variant | {shares_header} | mean score per model ({', '.join(pretrained + [RANDOM])}) |")
    print("|---|---|---|" + "---|" * len(pretrained) + "---|")
    for size in [int(s) for s in args.sizes.split(",")]:
        scores = {v: {m: [] for m in features} for v in variants}
        priors = []
        for seed in range(args.seeds):
            rows = sample_rows(labels, "classification", size, seed)
            y = labels[rows]
            priors.append(prior_only_evidence(y, "classification", num_classes=classes))
            for v, score in variants.items():
                for m, f in features.items():
                    scores[v][m].append(score(f[rows], y))
        for v in variants:
            rand = np.array(scores[v][RANDOM])
            shares = [f"{np.mean(rand > np.array(scores[v][m])):.0%}" for m in pretrained]
            means = ", ".join(f"{np.mean(scores[v][m]):.3f}" for m in features)
            print(f"| {size} | {np.mean(priors):.3f} | {v} | " + " | ".join(shares) + f" | {means} |")


if __name__ == "__main__":
    main()

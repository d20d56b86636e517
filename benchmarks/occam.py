"""LogME's Occam failure on real data, and the fix: logme_projected (an intercept, and the number of leading principal
directions chosen by maximum evidence).

With few labelled examples, LogME's Occam factor charges every feature dimension, so a wide pretrained model can
score below a narrow randomly initialised one and even below the labels-only baseline. This script extracts real
features once (BBC News, real pretrained models from the demo hub, plus a randomly initialised 32-d BERT as the
model that should lose), then for growing numbers of examples reports, per model:
  LogME, LogME of the label-prior-only baseline, logme_projected (LogME with an intercept on the k leading
  directions of [F, 1], k by max evidence), and ridge_loo (leave-one-out accuracy of a ridge probe).
It counts how often the random model outranks a pretrained one under each score (mean over sample seeds).

It also asks what a user would see: the paired bootstrap probability that the random model is really better
(LogME's influence replicates, the same machinery as a rank job's p_better_than_next), so a flipped pair that the
interval calls a coin toss is told apart from a confident wrong answer.

Usage: python -m benchmarks.occam [--sizes 25,50,100,200,400] [--seeds 5] [--hub DIR] [--rows 400]
       python -m benchmarks.data.kaomoji --out /tmp/kaomoji5.csv && python -m benchmarks.occam \
           --data /tmp/kaomoji5.csv --max-length 32 --seeds 10
       python -m benchmarks.data.austen --package PKG --out /tmp/austen.csv && python -m benchmarks.occam \
           --data /tmp/austen.csv --rows 1200 --max-length 64 --sizes 50,100,200,400,1200 --seeds 10
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from workers.features import extract_features
from workers.pipeline import distinct_examples, sample_rows
from workers.ranking import LogMEMetric, bootstrap_scores, logme, logme_projected, prior_only_evidence, ridge_loo


def read_text_label_csv(path: Path, rows: int | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """Texts, sorted class names and class indices of a text,label CSV: each text once, as a rank job reads a
    dataset (repeats make LogME's evidence unbounded when N <= D), the first `rows` of them."""
    with path.open(encoding="utf-8") as fh:
        records = list(csv.DictReader(fh))
    records = [records[i] for i in distinct_examples([r["text"] for r in records])][:rows]
    names = sorted({r["label"] for r in records})
    return [r["text"] for r in records], names, np.array([names.index(r["label"]) for r in records])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hub", type=Path, default=Path(os.environ.get("HUBTUNE_HOME", "~/.hubtune")).expanduser()
                        / "demo-hub")
    parser.add_argument("--models", default="all-MiniLM-L6-v2,paraphrase-MiniLM-L3-v2,all-mpnet-base-v2")
    parser.add_argument("--sizes", default="25,50,100,200,400")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--bootstrap", type=int, default=200, help="paired bootstrap resamples per pair")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--data", type=Path, default=None, help="CSV with text,label columns (default: the hub's "
                        "bbc_news.csv)")
    args = parser.parse_args()

    texts, names, labels = read_text_label_csv(args.data or args.hub / "bbc_news.csv", args.rows)

    features: dict[str, np.ndarray] = {}
    began = time.perf_counter()
    for name in args.models.split(","):
        features[name] = extract_features(args.hub / name, texts, max_length=args.max_length).features
    with tempfile.TemporaryDirectory() as tmp:
        from tests.tiny_models import make_tiny_bert

        random_model = make_tiny_bert(Path(tmp) / "random-32", hidden_size=32, num_layers=2, seed=0)
        features["random-init-32d"] = extract_features(random_model, texts, max_length=args.max_length).features
    extraction = time.perf_counter() - began

    sizes = [int(s) for s in args.sizes.split(",")]
    pretrained = [m for m in features if m != "random-init-32d"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {(args.data or Path('bbc_news.csv')).name}, "
          f"{len(texts)} docs, "
          f"{len(names)} classes; feature extraction {extraction:.0f}s; {args.seeds} sample seeds per size\n")
    header = "| N | model | dim | LogME | prior-only | beats prior | logme_projected (k) | ridge_loo accuracy |"
    print(header)
    print("|---|---|---|---|---|---|---|---|")
    flips = {"logme": [], "logme_projected": [], "ridge_loo": []}
    below_prior = {"logme": [], "logme_projected": []}
    # per size: [random first, ... with P >= 0.95, pretrained first, ... with P(random better) <= 0.05]
    confidence: dict[int, list[int]] = {}
    for size in sizes:
        table: dict[str, list[tuple[float, float, float, int, float]]] = {m: [] for m in features}
        for seed in range(args.seeds):
            rows = sample_rows(labels, "classification", size, seed)
            y = labels[rows]
            prior = prior_only_evidence(y, "classification", num_classes=len(names))
            for model, f in features.items():
                plain = logme(f[rows], y, num_classes=len(names), compute_weights=False).score
                projected = logme_projected(f[rows], y, num_classes=len(names))
                table[model].append((plain, prior, projected.score, projected.k, ridge_loo(f[rows], y)))
            # What a rank job's paired bootstrap says about each random-vs-pretrained pair (LogME).
            counts = confidence.setdefault(size, [0, 0, 0, 0])
            for model in pretrained:
                boot = bootstrap_scores(LogMEMetric("classification", num_classes=len(names)),
                                        {model: features[model][rows], "random": features["random-init-32d"][rows]},
                                        y, n_boot=args.bootstrap, seed=seed)
                p_random = float(np.mean(boot["replicates"]["random"] > boot["replicates"][model]))
                if boot["point"]["random"] > boot["point"][model]:
                    counts[0] += 1
                    counts[1] += p_random >= 0.95
                else:
                    counts[2] += 1
                    counts[3] += p_random <= 0.05
        for model, values in table.items():
            v = np.array(values, dtype=float)
            print(f"| {size} | {model} | {features[model].shape[1]} | {v[:, 0].mean():.3f} | {v[:, 1].mean():.3f} "
                  f"| {np.mean(v[:, 0] > v[:, 1]):.0%} | {v[:, 2].mean():.3f} (k≈{np.median(v[:, 3]):.0f}) "
                  f"| {v[:, 4].mean():.3f} |")
        for column, metric in ((0, "logme"), (2, "logme_projected"), (4, "ridge_loo")):
            rand = np.array([x[column] for x in table["random-init-32d"]])
            beaten = np.mean([np.mean(rand > np.array([x[column] for x in table[m]])) for m in pretrained])
            flips[metric].append((size, beaten))
            if metric == "ridge_loo":
                continue  # an accuracy: no evidence baseline to compare with
            under = np.mean([np.mean(np.array([x[column] for x in table[m]]) <= np.array([x[1] for x in table[m]]))
                             for m in pretrained])
            below_prior[metric].append((size, under))
    print("\nShare of (pretrained model, seed) pairs in which the random 32-d model scores higher:")
    print("| N | LogME | logme_projected | ridge_loo |")
    print("|---|---|---|---|")
    for (size, plain), (_, projected), (_, probe) in zip(flips["logme"], flips["logme_projected"],
                                                          flips["ridge_loo"]):
        print(f"| {size} | {plain:.0%} | {projected:.0%} | {probe:.0%} |")
    print("\nShare of (pretrained model, seed) pairs scoring at or below the label-prior-only evidence:")
    print("| N | LogME | logme_projected |")
    print("|---|---|---|")
    for (size, plain), (_, projected) in zip(below_prior["logme"], below_prior["logme_projected"]):
        print(f"| {size} | {plain:.0%} | {projected:.0%} |")
    print(f"\nDoes the interval say so? Paired bootstrap of LogME ({args.bootstrap} resamples, as a rank job computes "
          "p_better_than_next) for every (pretrained model, seed) pair:")
    print("| N | random first | ... with P(random better) >= 0.95 | pretrained first "
          "| ... with P(random better) <= 0.05 |")
    print("|---|---|---|---|---|")
    for size, (rand_first, rand_sure, pre_first, pre_sure) in confidence.items():
        print(f"| {size} | {rand_first} | {rand_sure} | {pre_first} | {pre_sure} |")


if __name__ == "__main__":
    main()

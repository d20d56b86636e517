"""How wide should LogME's interval be? Each bootstrap method's spread against the real spread of the score.

For a dataset and two or more models, the score of each model (and the difference between the first two) is
computed on `--draws` independent stratified samples of N rows from the pool: the standard deviation over those
draws, times the finite-population correction 1/sqrt(1 - N/pool), is what an interval at N rows should reflect.
On the first `--boot-sets` draws each method's bootstrap spread (standard deviation of its 200 replicates) is
recorded, and the table prints it as a ratio to that empirical spread (1.0 = right; below 1 = overconfident) with
its seconds per model, and the time of each method as a ratio to the subsample refits measured in the same run:
  influence  first-order replicates from each row's influence on the evidence (the default when N > D)
  loo        re-weighted leave-one-out log predictive densities at the same fit (the default when N <= D)
  subsample  refits on the distinct rows of 50 resamples (the delete-d jackknife; the N <= D default until 2026-12)

Usage: python -m benchmarks.logme_intervals --hub DIR --models a,b --data FILE [--task classification]
       [--sizes 100,300,1000] [--draws 12] [--boot-sets 4] [--pool 3000] [--cache DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from benchmarks.rank_vs_finetune import load_dataset, subsample
from workers.ranking import logme, logme_influence, logme_loo_terms
from workers.ranking.uncertainty import LogMEMetric, resample_counts

METHODS = ("influence", "loo", "subsample")
SUBSAMPLE_RESAMPLES = 50


def pooled_features(folder: Path, examples: list, cache: Path | None, tag: str, max_length: int) -> np.ndarray:
    """Features of every pooled example, stored in `cache` (one .npy per data set and model) when given."""
    from workers.features import extract_features

    path = cache / f"{tag}-{folder.name}.npy" if cache else None
    if path is not None and path.is_file():
        return np.load(path).astype(np.float64)
    features = extract_features(folder, examples, max_length=max_length).features
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, features)
    return features.astype(np.float64)


def method_replicates(method: str, features: np.ndarray, labels: np.ndarray, task: str,
                      counts: np.ndarray) -> np.ndarray:
    n = len(labels)
    if method == "subsample":
        return LogMEMetric(task, method="subsample").replicates(features, labels, counts[:SUBSAMPLE_RESAMPLES])[1]
    per_row = logme_influence if method == "influence" else logme_loo_terms
    score, terms = per_row(features, labels, task)
    return score + (counts - 1.0) @ terms / n


def run(features: dict[str, np.ndarray], labels: np.ndarray, task: str, sizes: list[int], draws: int,
        boot_sets: int) -> list[dict]:
    names = list(features)
    pool = len(labels)
    rows_out = []
    for n in sizes:
        scores: dict[str, list[float]] = {m: [] for m in names}
        spread: dict[str, dict[str, list[float]]] = {k: {q: [] for q in [*names, "diff"]} for k in METHODS}
        seconds = dict.fromkeys(METHODS, 0.0)
        dims = {m: f.shape[1] for m, f in features.items()}
        for draw in range(draws):
            idx = subsample(labels, task, n, 100 + draw)
            y = labels[idx]
            for m in names:
                scores[m].append(logme(features[m][idx], y, task, compute_weights=False).score)
            if draw >= boot_sets:
                continue
            stratify = task == "classification"
            counts = resample_counts(y if stratify else None, len(idx), 200, np.random.default_rng(draw), stratify)
            reps: dict[str, dict[str, np.ndarray]] = {k: {} for k in METHODS}
            for m in names:
                for k in METHODS:
                    began = time.perf_counter()
                    reps[k][m] = method_replicates(k, features[m][idx], y, task, counts)
                    seconds[k] += time.perf_counter() - began
            for k in METHODS:
                for m in names:
                    spread[k][m].append(float(np.std(reps[k][m])))
                spread[k]["diff"].append(float(np.std(reps[k][names[0]] - reps[k][names[1]])))
        correction = 1.0 / np.sqrt(max(1.0 - len(idx) / pool, 1e-9))
        empirical = {m: float(np.std(scores[m], ddof=1)) * correction for m in names}
        empirical["diff"] = float(np.std(np.subtract(scores[names[0]], scores[names[1]]), ddof=1)) * correction
        for q in [*names, "diff"]:
            rows_out.append({
                "n": len(idx), "quantity": q if q != "diff" else f"{names[0]} - {names[1]}",
                "d": dims.get(q), "empirical": empirical[q],
                "ratio": {k: float(np.mean(spread[k][q])) / empirical[q] for k in METHODS},
                "seconds": {k: seconds[k] / (boot_sets * len(names)) for k in METHODS},
                "mean_score": float(np.mean(scores[q])) if q in scores else None,
            })
    return rows_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hub", type=Path, required=True)
    parser.add_argument("--models", required=True, help="comma-separated folder names under --hub (two or more)")
    parser.add_argument("--data", type=Path, required=True, help="any upload HubTune reads (CSV, JSONL, Parquet, zip)")
    parser.add_argument("--task", default="classification")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--sizes", default="100,300,1000")
    parser.add_argument("--draws", type=int, default=12)
    parser.add_argument("--boot-sets", type=int, default=4)
    parser.add_argument("--pool", type=int, default=3000, help="rows of the data set drawn from (stratified)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--cache", type=Path, help="folder keeping the pooled features between runs")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    models = args.models.split(",")
    if len(models) < 2:
        parser.error("--models needs two or more models (the difference of the first two is reported)")
    examples, labels, _ = load_dataset(args.data, args.task, args.text_column, args.label_column)
    keep = subsample(labels, args.task, args.pool, 0)
    examples, labels = [examples[i] for i in keep], labels[keep]
    tag = f"{args.data.stem}-{len(keep)}"
    features = {m: pooled_features(args.hub / m, examples, args.cache, tag, args.max_length) for m in models}
    sizes = [int(s) for s in args.sizes.split(",")]
    began = time.perf_counter()
    rows = run(features, labels, args.task, sizes, args.draws, args.boot_sets)

    lines = [f"Data: {args.data.name}, task {args.task}, pool {len(labels)} rows; models {', '.join(models)} "
             f"(D = {', '.join(str(f.shape[1]) for f in features.values())}); {args.draws} draws per size, method "
             f"spreads averaged over the first {args.boot_sets}; {time.perf_counter() - began:.0f} s of scoring.",
             f"Machine: {platform.machine()}, {platform.node()[:20]}, {datetime.now():%Y-%m-%d %H:%M}", "",
             "| N | quantity | mean score | empirical sd | influence / emp | loo / emp | subsample / emp "
             "| s per model: influence, loo, subsample | time loo / subsample |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mean = "" if r["mean_score"] is None else f"{r['mean_score']:.3f}"
        s = r["seconds"]
        lines.append(f"| {r['n']} | {r['quantity']} | {mean} | {r['empirical']:.4f} | "
                     + " | ".join(f"{r['ratio'][k]:.2f}" for k in METHODS)
                     + f" | {s['influence']:.3f}, {s['loo']:.3f}, {s['subsample']:.3f} | "
                     f"{s['loo'] / max(s['subsample'], 1e-9):.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        command = ("python -m benchmarks.logme_intervals --hub " + str(args.hub) + " --models " + args.models
                   + f" --data {args.data} --sizes {args.sizes} --draws {args.draws} --boot-sets {args.boot_sets}"
                   + f" --pool {args.pool}")
        args.out.write_text(f"# LogME interval width against the score's real spread "
                            f"(`benchmarks/logme_intervals.py`)\n\nCommand: `{command}`  \n" + text + "\n",
                            encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

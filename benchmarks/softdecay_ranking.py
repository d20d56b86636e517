"""Does a rank job's `feature_transform: softdecay` change how well its ranking agrees with the truth?

CPU-sized: the model-selection suite's pieces (benchmarks.model_selection: split, cached features, head-only
truth; benchmarks.selection_report.agreement: weighted tau) on a few real text sets, with and without SoftDecay
(workers.ranking.softdecay) of each sample's N x D features, in the same run. The truth is about the models, not the
transform: a linear probe trained on the whole train pool of each model's plain last-layer features, scored on the
test split. What changes is only what the estimators (the defaults, ridge_loo and logme) read on each sample.

    python -m benchmarks.softdecay_ranking --work /tmp/softdecay_bench --hub /tmp/fanhub \\
        --set bbc_news=/tmp/fanhub/bbc_news.csv --set kaomoji=/tmp/softdecay_bench/kaomoji.csv
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import model_selection as ms  # noqa: E402
from benchmarks import rank_vs_finetune as rvf  # noqa: E402
from benchmarks.selection_report import agreement  # noqa: E402

ESTIMATORS = ("ridge_loo", "logme")  # service.contract.DEFAULT_METRICS


def set_scores(name: str, path: Path, hub: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Truth per model and, per sample size and draw, each estimator's score per model and alpha."""
    from workers.pipeline import ranking_targets
    from workers.ranking import score_estimator
    from workers.ranking.softdecay import softdecay, spectrum_skew

    examples, labels, _ = rvf.load_dataset(path, "classification", "text", "label")
    train, test = ms.split_rows(labels, "classification", args.test_rows, args.train_rows, args.data_seed)
    models = sorted(p.name for p in hub.iterdir() if (p / "config.json").is_file())
    out: dict[str, Any] = {"rows": len(examples), "train": len(train), "test": len(test), "truth": {},
                           "skew": {}, "scores": {}}
    feats = {}
    for model in models:
        began = time.perf_counter()
        feats[model] = ms.model_features(hub / model, examples, args.work / "features" / name / f"{model}.npz",
                                         args)["last"].astype(np.float64)
        x = feats[model]
        out["truth"][model], _ = rvf.linear_probe("classification", x[train], labels[train], x[test], labels[test])
        print(f"  {name} {model}: truth {out['truth'][model]:.3f} ({time.perf_counter() - began:.1f} s)", flush=True)
    for size in args.sample_rows:
        size = min(size, len(train))
        for draw in range(args.draws):
            rows = train[rvf.subsample(labels[train], "classification", size, draw)]
            targets = ranking_targets(labels[rows], "classification")
            for alpha in args.alphas:
                key = f"{size}/{draw}/{alpha}"
                out["scores"][key] = {}
                for model in models:
                    x = feats[model][rows]
                    x = x if alpha == 0.0 else softdecay(x, alpha)
                    out["skew"].setdefault(f"{size}/{alpha}", {}).setdefault(model, []).append(spectrum_skew(x))
                    out["scores"][key][model] = {e: float(score_estimator(e, x, targets, "classification"))
                                                 for e in ESTIMATORS}
    return out


def summary(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Mean weighted tau (over draws) per set, sample size, estimator and alpha; alpha 0 is no transform."""
    lines = ["| set | rows | estimator | " + " | ".join(
        "none" if a == 0.0 else f"softdecay {a}" for a in args.alphas) + " |",
             "|---|---|---|" + "---|" * len(args.alphas)]
    means: dict[tuple[str, float], list[float]] = {}
    for name, res in results.items():
        models = sorted(res["truth"])
        truth = [res["truth"][m] for m in models]
        for size in args.sample_rows:
            size = min(size, res["train"])
            for estimator in ESTIMATORS:
                cells = []
                for alpha in args.alphas:
                    taus = []
                    for draw in range(args.draws):
                        scores = res["scores"][f"{size}/{draw}/{alpha}"]
                        got = agreement([scores[m][estimator] for m in models], truth)
                        if got is not None:
                            taus.append(got["weightedtau"])
                    means.setdefault((estimator, alpha), []).append(float(np.mean(taus)))
                    cells.append(f"{np.mean(taus):.3f} ± {np.std(taus):.3f}")
                lines.append(f"| {name} | {size} | {estimator} | " + " | ".join(cells) + " |")
    for estimator in ESTIMATORS:
        lines.append(f"| **mean** | | {estimator} | " + " | ".join(
            f"**{np.mean(means[(estimator, a)]):.3f}**" for a in args.alphas) + " |")
    skews = ["", "Spectrum skew s_1 / sum(s) of a sample's features, mean over models and draws:"]
    for name, res in results.items():
        for size in args.sample_rows:
            size = min(size, res["train"])
            cells = []
            for alpha in args.alphas:
                per_model = res["skew"][f"{size}/{alpha}"].values()
                cells.append(f"{'none' if alpha == 0.0 else alpha} {np.mean([np.mean(v) for v in per_model]):.3f}")
            skews.append(f"- {name}, {size} rows: " + ", ".join(cells))
    return lines + skews


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="features and results are stored here")
    p.add_argument("--hub", type=Path, required=True, help="a folder of candidate model folders")
    p.add_argument("--set", action="append", required=True, metavar="NAME=CSV", help="text,label CSV (repeat)")
    p.add_argument("--alphas", default="0,-0.2,-0.6", help="0: no transform; -0.6: a rank job's default")
    p.add_argument("--sample-rows", default="100,200")
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--train-rows", type=int, default=1000)
    p.add_argument("--test-rows", type=int, default=400)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--feature-batch", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "softdecay_ranking.json")
    args = p.parse_args(argv)
    args.alphas = [float(a) for a in args.alphas.split(",")]
    args.sample_rows = [int(r) for r in args.sample_rows.split(",")]
    results = {}
    for item in args.set:
        name, _, path = item.partition("=")
        results[name] = set_scores(name, Path(path), args.hub, args)
    lines = summary(results, args)
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": ms.machine(), "argv": sys.argv[1:], "results": results,
                                    "table": lines}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

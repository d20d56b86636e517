"""The model-selection suite: does a ranking pick, from few rows, the models that do best on the task?

One command builds everything it needs (data sets from installed packages, a hub of real and derived candidates),
and is resumable: every feature matrix, probe and fine-tuning run is stored under --work as it finishes, and a
rerun skips what is there. Per data set:

1. the rows are split once into a train pool and a held-out test split (stratified for classification);
2. per candidate model, one forward pass over both (workers.features, what a rank job computes: mean pooling,
   every layer's pooled state kept);
3. ground truth, per model:
   - head-only: a trained linear probe (L2 strength by 3-fold cross-validation) on the whole train pool, scored on
     the test split; the better of the last layer's features and the mean of all layers' (plentiful rows);
   - fine-tuning (--finetune SET,...): the model with its own Hugging Face head, fine-tuned on the train pool at
     each learning rate of --lrs and each seed of --seeds, the same budget for all, scored on the test split;
     its truth is the best learning rate's mean over seeds;
4. what a user's rank job sees: --draws samples of each --sample-rows size from the train pool; on each, every
   estimator with features from the last layer and from the mean of all layers, a trained linear probe's
   cross-validated quality on the sample, and the static baselines (parameter count, feature width).

The report (benchmarks.selection_report) gives, per data set and averaged, each ranking's weighted τ, Kendall τ,
Pearson r, Rel@1 and Rel@3 against each truth, beside the expected value of a random order, and names the
combination with the best mean agreement. Sets listed in --holdout are left out of that choice and reported after
it ("a set added last").

    python -m benchmarks.model_selection --work /tmp/sel                 # CPU-sized defaults
    python -m benchmarks.model_selection --work /tmp/sel --finetune diabetes,kaomoji_tags --max-minutes 60
    python -m benchmarks.model_selection --work /tmp/sel --report-only
    python -m benchmarks.model_selection --work /tmp/sel --data my.csv --task classification   # any upload
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import rank_vs_finetune as rvf  # noqa: E402
from benchmarks import selection_report  # noqa: E402

TEXT_HUB = ("all-MiniLM-L6-v2", "all-MiniLM-L6-v2-first-2-layers", "paraphrase-MiniLM-L3-v2", "all-mpnet-base-v2",
            "all-mpnet-base-v2-first-4-layers", "SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct-first-10-layers",
            "gemma-3-270m", "random-init-32d")
IMAGE_HUB = ("mobilenet_v2-imagenet", "random-init-mobilenet_v2")
LAYER_CHOICES = ("last", "all")


@dataclass(frozen=True)
class DataSet:
    name: str
    kind: str  # what the task asks of a model, for the tables
    task: str
    file: str
    writer: list[str]  # argv after `python -m`, {out} and {pkg} filled in; empty: written in-process
    text_column: str = "text"
    label_column: str = "label"
    text_pair_column: str | None = None
    packages: tuple[str, ...] = field(default=())  # Debian packages the writer reads (apt-get download, dpkg -x)


SETS: dict[str, DataSet] = {s.name: s for s in (
    DataSet("bbc_news", "topic", "classification", "bbc_news.csv", []),
    DataSet("kaomoji", "emotion", "classification", "kaomoji.csv",
            ["benchmarks.data.kaomoji", "--out", "{out}", "--rows", "1500"]),
    DataSet("austen", "authorship", "classification", "austen.csv",
            ["benchmarks.data.austen", "--package", "{pkg}", "--out", "{out}", "--rows", "1500"],
            packages=("r-cran-janeaustenr",)),
    DataSet("headline_pairs", "text pairs", "classification", "headline_pairs.jsonl",
            ["benchmarks.data.headline_pairs", "--out", "{out}", "--rows", "1200"],
            text_column="headline", text_pair_column="article"),
    DataSet("kaomoji_tags", "multi-label emotion", "multilabel", "kaomoji_tags.csv",
            ["benchmarks.data.kaomoji_tags", "--out", "{out}", "--rows", "1500"]),
    DataSet("diabetes", "regression (table as text)", "regression", "diabetes.csv",
            ["benchmarks.data.sklearn_tables", "--table", "diabetes", "--out", "{out}"]),
    DataSet("breast_cancer", "diagnosis (table as text)", "classification", "breast_cancer.csv",
            ["benchmarks.data.sklearn_tables", "--table", "breast_cancer", "--out", "{out}"]),
    DataSet("fashion_mnist", "images", "classification", "fashion_mnist.zip",
            ["benchmarks.data.fashion_mnist", "--package", "{pkg}", "--out", "{out}", "--rows", "1200"],
            packages=("dataset-fashion-mnist",)),
)}
DEFAULT_SETS = ("bbc_news", "kaomoji", "austen", "headline_pairs", "kaomoji_tags", "diabetes", "breast_cancer")
DEFAULT_HOLDOUT = ("breast_cancer",)


# ------------------------------------------------------------------------------------------------ preparation


def debian_package(name: str, root: Path) -> Path:
    """The folder a Debian package was extracted into (apt-get download + dpkg -x; no system install)."""
    target = root / name
    if not target.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", name], cwd=root, check=True, capture_output=True)
        deb = next(root.glob(f"{name}_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(target)], check=True)
    return target


def write_set(spec: DataSet, work: Path) -> Path:
    """The data set's file under WORK/data, written once."""
    out = work / "data" / spec.file
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if spec.name == "bbc_news":
        from demo.prepare_hub import write_bbc_csv

        write_bbc_csv(out, rows=0)
        return out
    pkg = str(debian_package(spec.packages[0], work / "pkgs")) if spec.packages else ""
    argv = [a.format(out=out, pkg=pkg) for a in spec.writer]
    subprocess.run([sys.executable, "-m", *argv], check=True, cwd=REPO)
    return out


def build_hub(work: Path, models: tuple[str, ...]) -> Path:
    hub = work / "hub"
    missing = [m for m in models if not (hub / m / "config.json").is_file()]
    if missing:
        subprocess.run([sys.executable, "-m", "demo.prepare_hub", "--out", str(hub), "--rows", "1",
                        "--models", ",".join(missing)], check=True, cwd=REPO)
    return hub


def split_rows(labels: np.ndarray, task: str, test_rows: int, train_rows: int, seed: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """(train pool, test) row indices: the test split a stratified sample of at most 30% of the rows."""
    test = rvf.subsample(labels, task, min(test_rows, int(0.3 * len(labels))), seed)
    rest = np.setdiff1d(np.arange(len(labels)), test)
    rng = np.random.default_rng(seed)
    train = np.sort(rng.permutation(rest)[:train_rows])
    return train, np.sort(test)


# ---------------------------------------------------------------------------------------------------- store


class Store:
    """One JSON file per data set: split, truths, fine-tuning runs, sample scores; saved after each piece."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def section(self, name: str) -> dict[str, Any]:
        return self.data.setdefault(name, {})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def model_features(folder: Path, examples: list[Any], cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Pooled features of every row, last layer and the mean of all layers, from one forward pass; cached."""
    from workers.features import extract_features

    if cache.is_file():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    result = extract_features(folder, examples, max_length=args.max_length, batch_size=args.feature_batch,
                              device=args.device)
    out = {"last": result.features.astype(np.float32),
           "params": np.array(result.num_parameters), "seconds": np.array(result.total_seconds)}
    if result.layer_features is not None:
        out["all"] = result.select("all").astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache.with_suffix(".tmp.npz"), **out)
    os.replace(cache.with_suffix(".tmp.npz"), cache)
    return out


# ----------------------------------------------------------------------------------------------------- runs


def probe_truth(task: str, feats: dict[str, Any], y: np.ndarray, train: np.ndarray, test: np.ndarray
                ) -> dict[str, float]:
    """Head-only truth: the linear probe on the train pool, scored on the test split, per layer choice."""
    out = {}
    for layers in LAYER_CHOICES:
        if layers in feats:
            x = feats[layers].astype(np.float64)
            out[layers], _ = rvf.linear_probe(task, x[train], y[train], x[test], y[test])
    return out


def probe_cv(task: str, x: np.ndarray, y: np.ndarray, seed: int) -> float | None:
    """A trained linear probe's 3-fold cross-validated quality on the sample alone, at the best L2 strength of
    rank_vs_finetune's grid (one level of folds: the choice's small optimism is shared by every model): the
    baseline an estimator must beat, since it is what a user could compute instead."""
    rng = np.random.default_rng(seed)
    folds = np.array_split(rng.permutation(len(x)), 3)
    best = None
    for lam in rvf.PROBE_STRENGTHS:
        scores = []
        for k in range(3):
            keep = np.concatenate([folds[j] for j in range(3) if j != k])
            if task == "classification" and len(np.unique(y[keep])) < 2:
                continue
            out = rvf._fit_predict(task, x[keep], y[keep], x[folds[k]], lam)
            scores.append(rvf._quality(task, out, y[folds[k]]))
        if scores and (best is None or float(np.mean(scores)) > best):
            best = float(np.mean(scores))
    return best


def sample_scores(task: str, feats: dict[str, Any], y: np.ndarray, rows: np.ndarray, estimators: list[str],
                  seed: int) -> dict[str, float | None]:
    """Every estimator at every layer choice on one sample, and the probe baseline: '<estimator>@<layers>'."""
    from workers.pipeline import ranking_targets
    from workers.ranking import score_estimator

    targets = ranking_targets(y[rows], task)
    out: dict[str, float | None] = {}
    for layers in LAYER_CHOICES:
        if layers not in feats:
            continue
        x = feats[layers][rows].astype(np.float64)
        for name in estimators:
            try:
                value = score_estimator(name, x, targets, task)
            except Exception as exc:  # one estimator failing must not hide the others
                print(f"    {name}@{layers} failed: {exc!r}", flush=True)
                value = None
            out[f"{name}@{layers}"] = None if value is None or not np.isfinite(value) else float(value)
        out[f"linear_probe_cv@{layers}"] = probe_cv(task, x, y[rows], seed)
    return out


def finetune_runs(spec: DataSet, store: Store, hub: Path, models: list[str], data: tuple[list[Any], np.ndarray,
                  list[str] | None], split: tuple[np.ndarray, np.ndarray], args: argparse.Namespace,
                  deadline: float) -> None:
    """Every (model, lr, seed) fine-tuning run not stored yet, until the deadline."""
    examples, y, names = data
    train, test = split
    runs = store.section("finetune")
    for model in models:
        for lr in args.lrs:
            for seed in args.seeds:
                key = f"{model}|{lr:g}|{seed}"
                if key in runs:
                    continue
                if time.monotonic() > deadline:
                    return
                ns = argparse.Namespace(epochs=args.epochs, lr=lr, batch_size=args.batch_size,
                                        max_length=args.max_length, device=args.device)
                run = rvf.finetune(hub / model, seed, spec.task, names,
                                   ([examples[i] for i in train], y[train]), ([examples[i] for i in test], y[test]),
                                   ns)
                runs[key] = {**run, "lr": lr}
                store.save()
                print(f"  {spec.name}: fine-tuned {model} lr {lr:g} seed {seed}: {run['quality']:.3f} "
                      f"({run['wall_seconds']:.0f} s)", flush=True)


# long: one data set end to end, each step resumable from the store
def run_set(spec: DataSet, work: Path, hub: Path, args: argparse.Namespace, deadline: float) -> Store:
    from workers.ranking import ESTIMATORS

    store = Store(work / "results" / f"{spec.name}.json")
    path = Path(args.data) if args.data else write_set(spec, work)
    examples, y, names = rvf.load_dataset(path, spec.task, spec.text_column, spec.label_column,
                                          text_pair_column=spec.text_pair_column)
    meta = store.section("meta")
    if "train" not in meta:
        train, test = split_rows(y, spec.task, args.test_rows, args.train_rows, args.data_seed)
        meta.update(train=train.tolist(), test=test.tolist(), dataset=spec.name, kind=spec.kind, task=spec.task,
                    rows=len(examples))
    train, test = np.asarray(meta["train"]), np.asarray(meta["test"])
    models = list(IMAGE_HUB if spec.name == "fashion_mnist" else args.models)
    meta.update(models=models, machine=machine(), max_length=args.max_length, command=" ".join(sys.argv))
    estimators = [n for n, e in ESTIMATORS.items() if e.applies_to(spec.task) and not e.needs_source_head]
    truths, samples, statics = store.section("probe_truth"), store.section("samples"), store.section("static")
    for model in models:
        if time.monotonic() > deadline:
            break
        feats = model_features(hub / model, examples, work / "features" / spec.name / f"{model}.npz", args)
        statics[model] = {"params": int(feats["params"]), "width": int(feats["last"].shape[1]),
                          "feature_seconds": float(feats["seconds"])}
        if model not in truths:
            truths[model] = probe_truth(spec.task, feats, y, train, test)
        for rows in args.sample_rows:
            for draw in range(args.draws):
                key = f"{model}|{rows}|{draw}"
                if key not in samples:
                    picked = train[rvf.subsample(y[train], spec.task, rows, 1000 + draw)]
                    samples[key] = sample_scores(spec.task, feats, y, picked, estimators, draw)
        store.save()
        print(f"  {spec.name}: {model} probe truth {truths[model]}", flush=True)
    if spec.name in args.finetune:
        finetune_runs(spec, store, hub, models, (examples, y, names), (train, test), args, deadline)
    meta.update(lrs=args.lrs, seeds=args.seeds, epochs=args.epochs, batch_size=args.batch_size)
    store.save()
    return store


def machine() -> str:
    import torch

    return (f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="data, hub, features and results live here")
    p.add_argument("--sets", default=",".join(DEFAULT_SETS), help=f"comma-separated, of {list(SETS)}")
    p.add_argument("--holdout", default=",".join(DEFAULT_HOLDOUT),
                   help="sets left out of choosing the default and reported after it")
    p.add_argument("--data", help="your own file instead of a named set (with --task, --text-column, ...)")
    p.add_argument("--task", default="classification")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--text-pair-column")
    p.add_argument("--models", default=",".join(TEXT_HUB), help="text candidates (hub names; derived ones built)")
    p.add_argument("--sample-rows", default="200,500", help="sizes of the samples estimators see")
    p.add_argument("--draws", type=int, default=3, help="samples of each size")
    p.add_argument("--train-rows", type=int, default=1000, help="train pool (the head-only truth's rows)")
    p.add_argument("--test-rows", type=int, default=400)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--feature-batch", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--finetune", default="", help="sets whose fine-tuning truth is run (resumable)")
    p.add_argument("--lrs", default="2e-5,5e-5,2e-4")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=0, help="stop starting new pieces after this (0: none)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "model_selection.md")
    args = p.parse_args(argv)
    args.sets = [s for s in args.sets.split(",") if s]
    args.holdout = [s for s in args.holdout.split(",") if s]
    args.models = tuple(m for m in args.models.split(",") if m)
    args.sample_rows = [int(r) for r in args.sample_rows.split(",") if r]
    args.finetune = [s for s in args.finetune.split(",") if s]
    args.lrs = [float(v) for v in args.lrs.split(",") if v]
    args.seeds = [int(v) for v in args.seeds.split(",") if v]
    if args.data:
        name = Path(args.data).stem
        SETS[name] = DataSet(name, "uploaded", args.task, Path(args.data).name, [], args.text_column,
                             args.label_column, args.text_pair_column)
        args.sets, args.holdout = [name], []
    unknown = [s for s in args.sets + args.holdout + args.finetune if s not in SETS]
    if unknown:
        p.error(f"unknown set(s) {unknown}; choose from {list(SETS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:  # numpy's BLAS threads only fight torch's on a shared machine: the estimators are small solves
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, user_api="blas")
    except ImportError:
        pass
    work: Path = args.work
    if not args.report_only:
        deadline = time.monotonic() + (args.max_minutes * 60 if args.max_minutes > 0 else float("inf"))
        text = [s for s in args.sets if s != "fashion_mnist"]
        hub = build_hub(work, args.models + (IMAGE_HUB if "fashion_mnist" in args.sets else ()))
        for name in text + [s for s in args.sets if s == "fashion_mnist"]:
            print(f"[model_selection] {name}", flush=True)
            run_set(SETS[name], work, hub, args, deadline)
    stores = {s: Store(work / "results" / f"{s}.json").data for s in args.sets}
    lines = selection_report.report({s: d for s, d in stores.items() if d}, args.holdout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

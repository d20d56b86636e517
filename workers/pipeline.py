"""The rank pipeline: dataset + candidate models -> features (cached) -> transferability scores with uncertainty.

Plain data in, plain data out: no database and no Celery here (workers/runner.py does that), so notebooks and
benchmarks call the same code the service runs.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.logs import log_context
from workers.hub import FOLDER_SOURCES, ResolvedModel, resolve_model
from workers.sampling import stratified_sample

log = logging.getLogger("hubtune.pipeline")

Progress = Callable[[str, float], None]
# A dataset's examples: texts, text pairs (read as the tokenizer's pair), or encoded image files.
Examples = list[str] | list[tuple[str, str]] | list[bytes]
# Estimators without a fast bootstrap path are refitted per resample: at most this many resamples, at least
# GENERIC_BOOTSTRAP_MIN, and otherwise as many as fit in GENERIC_BOOTSTRAP_SECONDS per model and metric (measured
# from the point estimate's own time), so a slow estimator cannot make scoring dwarf feature extraction.
GENERIC_BOOTSTRAP_CAP = 50
GENERIC_BOOTSTRAP_MIN = 10
GENERIC_BOOTSTRAP_SECONDS = 5.0


class UnscorableTargets(ValueError):
    """The labels of the rows at hand give the estimators nothing to score (no multi-label label occurs, or a constant
    regression target); callers that can go on without a score catch this and only this."""


@dataclass(frozen=True)
class ModelSpec:
    id: str
    name: str
    source: str  # "hf" | "local" | "checkpoint"
    locator: str  # repo id or folder
    revision: str

    def resolve(self, hf_cache_dir: Path | None) -> ResolvedModel:
        """The local folder of this model and the revision that pins its content (workers.hub.resolve_model): a hub
        snapshot in `hf_cache_dir`, or the registered folder (a local one, or a job's checkpoint)."""
        hub, local = self.source == "hf", self.source in FOLDER_SOURCES
        return resolve_model(self.source, repo_id=self.locator if hub else None,
                             revision=self.revision if hub else None, path=self.locator if local else None,
                             cache_dir=hf_cache_dir)


@dataclass(frozen=True)
class DatasetSpec:
    path: Path  # the normalised Parquet file (service.datasets.write_normalized)
    task: str
    label_names: list[str] | None


@dataclass
class RankedModel:
    model_id: str
    name: str
    rank: int
    scores: dict[str, float | None]
    feature_seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def distinct_examples(examples: Examples) -> np.ndarray:
    """Indices of the first occurrence of each example (text, text pair or image file), in order.

    A repeated example is no new evidence, and for LogME it is worse than that: rows with identical features give a
    direction in sample space that no feature can see, and every target that agrees on those rows (all of them for
    an exact duplicate; all but two one-vs-rest targets for the same text under two labels) is then fitted there
    with zero residual. Once the distinct rows are no more than the feature width the evidence grows without bound
    as the noise variance goes to zero, and the score is wherever the solver stops. Real data repeat themselves
    (BBC News holds 100 duplicate articles in 2,225), so ranking and tuning read each text once, with its first
    label."""
    seen: set[Any] = set()
    keep: list[int] = []
    for index, example in enumerate(examples):
        if example not in seen:
            seen.add(example)
            keep.append(index)
    return np.asarray(keep, dtype=np.int64)


def load_dataset(spec: DatasetSpec) -> tuple[Examples, np.ndarray]:
    """Examples (texts, text pairs, or encoded image files) and a label array in the form the estimators take (ints, N×C
    multi-hot, or floats), each distinct example once (see distinct_examples: for images, byte-identical files)."""
    from service.datasets import read_normalized

    examples, raw_labels = read_normalized(spec.path)
    labels: np.ndarray
    if spec.task == "classification":
        labels = np.asarray(raw_labels, dtype=np.int64)
    elif spec.task == "multilabel":
        num_classes = len(spec.label_names or [])
        labels = np.zeros((len(raw_labels), num_classes), dtype=np.float64)
        for row, indices in enumerate(raw_labels):
            labels[row, list(indices)] = 1.0
    else:
        labels = np.asarray(raw_labels, dtype=np.float64)
    keep = distinct_examples(examples)
    return [examples[i] for i in keep], labels[keep]


def examples_digest(examples: Examples) -> str:
    """sha256 over exactly these examples in this order: the dataset part of a feature-cache key.

    Not the upload's sha256: one file uploaded twice with another text or image column, or another label column
    (which changes a stratified sample's rows), holds other examples, and a key naming the file returned the first
    upload's features for the second."""
    digest = hashlib.sha256()
    for example in examples:
        parts = example if isinstance(example, tuple) else (example,)  # a text pair hashes as two parts
        digest.update(len(parts).to_bytes(1, "little"))
        for part in parts:
            data = part.encode("utf-8", "surrogatepass") if isinstance(part, str) else bytes(part)
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return f"{digest.hexdigest()[:40]}-n{len(examples)}"


def ranking_targets(labels: np.ndarray, task: str) -> np.ndarray:
    """The labels the estimators score: regression targets standardised (mean 0, unit variance per column),
    multi-label targets without the labels that never occur, classification labels as they are.

    LogME has no bias term (as published), so on a raw target with a non-zero mean most of a model's evidence is
    whether its features can represent a constant: on 600 Austen lines with y = log(characters), mean 4.19 and
    std 0.15, every pretrained model scored below the label-mean baseline (MiniLM-L6 -1.37 against 0.45) and the ranking
    followed the models' mean feature vectors. Centred, the mean is the baseline's business and the models are
    compared on what they explain; the scale only shifts every model's score by the same -log(std) and is removed
    so that scores read alike across datasets."""
    if task == "multilabel":
        # A label with no positive row among those ranked (its rows were repeats, or not sampled) says nothing
        # about any model, and LogME of an all-zero target is unbounded: score the labels that occur.
        present = np.asarray(labels).any(axis=0)
        if not present.any():
            raise UnscorableTargets("no label occurs in the rows scored")
        return labels if present.all() else labels[:, present]
    if task != "regression":
        return labels
    values = np.asarray(labels, dtype=np.float64)
    spread = values.std(axis=0)
    if np.any(spread == 0):
        raise UnscorableTargets("the regression target is constant on the rows scored")
    return (values - values.mean(axis=0)) / spread


def sample_rows(labels: np.ndarray, task: str, size: int | None, seed: int) -> np.ndarray:
    """Row indices (sorted) of a sample of `size` rows, stratified by class for classification with at least one row
    of each class (workers.sampling); all rows if size is None."""
    return stratified_sample(labels, size, seed, stratify=task == "classification", minimum=1)


def model_features(model: ModelSpec, examples: Examples, cache_tag: str, *, cache_root: Path, hf_cache_dir: Path,
                   max_length: int, batch_size: int, device: str | None,
                   on_batch: Callable[[int, int], None] | None = None, pooling: str = "mean",
                   token_ids: Any | None = None) -> tuple[Any, bool]:
    """Features for one model, from the artifact cache when this (data, model, revision, pooling, length) was seen.
    token_ids: the job's `features.TokenIdsCache` for `examples`, so candidates sharing a tokenizer tokenise once."""
    from workers.features import FeatureCache, extract_features

    resolved = model.resolve(hf_cache_dir)
    # The resolved revision: a hub commit hash, or a local folder's content hash recomputed now, so a folder
    # changed after registration does not get its old features back.
    cache = FeatureCache.configured(cache_root)
    key = cache.key(cache_tag, model.id, resolved.revision, pooling, max_length)
    cached = cache.load(key)
    if cached is not None:
        return cached, True
    result = extract_features(resolved.path, examples, max_length=max_length, batch_size=batch_size, device=device,
                              on_batch=on_batch, pooling=pooling, token_ids=token_ids)
    cache.save(key, result)
    return result, False


def score_model(metrics: list[str], features: np.ndarray, labels: np.ndarray, task: str,
                source_probs: np.ndarray | None) -> tuple[dict[str, float | None], dict[str, Any]]:
    from workers.ranking import score_estimator

    scores: dict[str, float | None] = {}
    notes: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for metric in metrics:
        began = time.perf_counter()
        value = score_estimator(metric, features, labels, task, source_probs=source_probs)
        seconds[metric] = time.perf_counter() - began
        scores[metric] = None if value is None else float(value)
        if value is None:
            notes[metric] = "not applicable: needs the model's own classification head"
    return scores, {"notes": notes, "score_seconds": seconds}


def bootstrap_count(requested: int, point_seconds: float) -> int:
    """Resamples for a refitted estimator whose point estimate took `point_seconds`."""
    affordable = int(GENERIC_BOOTSTRAP_SECONDS / max(point_seconds, 1e-3))
    return min(requested, GENERIC_BOOTSTRAP_CAP, max(GENERIC_BOOTSTRAP_MIN, affordable))


def bootstrap_metric(metric: str, scored: dict[str, np.ndarray], labels: np.ndarray, task: str, *,
                     num_classes: int | None, requested: int, point_seconds: float, seed: int
                     ) -> tuple[dict[str, Any], int]:
    """Paired bootstrap of one metric over the models in `scored` (features, or source probabilities for LEEP/NCE):
    (bootstrap_scores' result, resamples used)."""
    from workers.ranking import LogMEMetric, RidgeLOOMetric, bootstrap_scores, logme_projected, score_estimator

    if metric in ("logme", "logme_projected"):
        if metric == "logme_projected":
            # LogME on the projection chosen from all rows (the choice of k held fixed): refitting the choice on
            # resamples, whose repeated rows inflate low-k evidence, gave intervals far wider than the scores.
            scored = {model_id: logme_projected(values, labels, task, num_classes=num_classes).project(values)
                      for model_id, values in scored.items()}
        # Leave-one-out replicates (about two LogME fits per model whatever the number of resamples), or below 100
        # rows with N <= D refits of under 100 rows, which cost little (see LogMEMetric): no time budget needed.
        metric_fn: Any = LogMEMetric(task, num_classes=num_classes)
        n_boot = requested
    elif metric == "ridge_loo":
        metric_fn = RidgeLOOMetric(task)  # one fit per model: re-weighted held-out outcomes
        n_boot = requested
    else:
        def metric_fn(values: np.ndarray, target: np.ndarray) -> float:
            if metric in ("leep", "nce"):
                value = score_estimator(metric, None, target, task, source_probs=values)
            else:
                value = score_estimator(metric, values, target, task)
            return np.nan if value is None else float(value)
        n_boot = bootstrap_count(requested, point_seconds)
    return bootstrap_scores(metric_fn, scored, labels, n_boot=n_boot, seed=seed), n_boot


class CandidatesFailed(RuntimeError):
    """Every candidate model failed before it could be scored; the message names each one and why."""

    def __init__(self, failures: dict[str, str]) -> None:
        super().__init__("no candidate model could be scored: "
                         + "; ".join(f"{name}: {error}" for name, error in failures.items()))
        self.failures = failures


def describe_failure(exc: Exception) -> str:
    """One line for the user: the exception's type and the first line of its message."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}"[:500]


def failed_model(metrics: list[str], exc: Exception, rows: int, seconds: float) -> dict[str, Any]:
    """The ranking record of a candidate that could not be loaded or run (no tokenizer, not a text model, out of
    memory...): no scores, ranked last, its error shown to the user instead of failing the whole job."""
    return {"scores": dict.fromkeys(metrics), "notes": {}, "score_seconds": dict.fromkeys(metrics, 0.0),
            "source_probs": None, "feature_seconds": 0.0,
            "details": {"rows": rows, "error": describe_failure(exc), "features_cached": False,
                        "wall_seconds": seconds}}


def rank(dataset: DatasetSpec, models: list[ModelSpec], metrics: list[str], **options: Any) -> list[RankedModel]:
    """The models of `rank_with_verdict`, best first."""
    return rank_with_verdict(dataset, models, metrics, **options)[0]


@dataclass
class FullRanking:
    ranked: list[RankedModel]  # best first
    verdict: dict[str, Any]  # workers.ranking.verdict
    feature_map: dict[str, Any]  # workers.projection.feature_map of the scored models on the ranked rows


def rank_with_verdict(dataset: DatasetSpec, models: list[ModelSpec], metrics: list[str], **options: Any
                      ) -> tuple[list[RankedModel], dict[str, Any]]:
    """The ranking and verdict of `rank_in_full`."""
    full = rank_in_full(dataset, models, metrics, **options)
    return full.ranked, full.verdict


@dataclass
class RankRows:
    """The rows a rank job scores, read once per process and shared by every candidate it scores."""

    examples: Examples
    raw_labels: np.ndarray  # as uploaded (the feature map colours by them)
    labels: np.ndarray  # as the estimators score them (ranking_targets)
    extraction: dict[str, Any]  # model_features' keyword arguments for these rows
    # the job's feature_transform (workers.ranking.softdecay.apply_feature_transform): applied to the N x D features
    # of these rows after layer selection, in whichever process scores or assembles; the cache keeps them raw
    transform: dict[str, Any] | None = None


def prepare_rows(dataset: DatasetSpec, *, cache_root: Path, hf_cache_dir: Path, sample_size: int | None = None,
                 seed: int = 0, max_length: int = 128, batch_size: int = 32, device: str | None = None,
                 pooling: str = "mean", feature_transform: dict[str, Any] | None = None) -> RankRows:
    """The dataset's distinct rows (a stratified sample of them when sample_size is set) with their targets, and
    the transform their features go through before scoring."""
    from workers.features import TokenIdsCache

    examples, labels = load_dataset(dataset)
    rows = sample_rows(labels, dataset.task, sample_size, seed)
    examples, raw_labels = [examples[i] for i in rows], labels[rows]
    extraction = dict(cache_tag=examples_digest(examples), cache_root=cache_root, hf_cache_dir=hf_cache_dir,
                      max_length=max_length, batch_size=batch_size, device=device, pooling=pooling,
                      token_ids=TokenIdsCache(len(examples)))  # candidates sharing a tokenizer tokenise once
    return RankRows(examples, raw_labels, ranking_targets(raw_labels, dataset.task), extraction, feature_transform)


def rank_in_full(dataset: DatasetSpec, models: list[ModelSpec], metrics: list[str], *, cache_root: Path,
                 hf_cache_dir: Path, sample_size: int | None = None, seed: int = 0, max_length: int = 128,
                 batch_size: int = 32, device: str | None = None, bootstrap_samples: int = 200,
                 progress: Progress | None = None, pooling: str = "mean", layers: str | list[int] = "last",
                 feature_transform: dict[str, Any] | None = None) -> FullRanking:
    """Rank `models` for `dataset` by the first metric, one candidate after another in this process (the service
    fans candidates out over workers instead and calls assemble_ranking once they are all done)."""
    report = progress or (lambda stage, fraction: None)
    rows = prepare_rows(dataset, cache_root=cache_root, hf_cache_dir=hf_cache_dir, sample_size=sample_size,
                        seed=seed, max_length=max_length, batch_size=batch_size, device=device, pooling=pooling,
                        feature_transform=feature_transform)
    features_by_model: dict[str, np.ndarray] = {}
    per_model: dict[str, dict[str, Any]] = {}
    for index, model in enumerate(models):
        where = (index / len(models) * 0.85, 0.85 / len(models))  # its part of the progress scale
        features, per_model[model.id] = score_candidate(
            model, f"features {index + 1}/{len(models)}: {model.name}", where, rows, dataset.task, metrics, report,
            layers)
        if features is not None:
            features_by_model[model.id] = features
    return assemble_ranking(dataset, models, rows, per_model, features_by_model, metrics,
                            bootstrap_samples=bootstrap_samples, seed=seed, progress=report)


def score_candidate(model: ModelSpec, stage: str, where: tuple[float, float], rows: RankRows, task: str,
                    metrics: list[str], report: Progress, layers: str | list[int] = "last"
                    ) -> tuple[np.ndarray | None, dict[str, Any]]:
    """One candidate's features (None if it failed) and its ranking record, its log lines tagged with its id."""
    with log_context(model_id=model.id):  # this candidate's lines, its features' included
        features, record = _score_candidate(model, stage, where, rows.examples, rows.labels, task, metrics, report,
                                            rows.extraction, layers, rows.transform)
        log.info("model %s: features %.2f s, scores %s", model.name, record["feature_seconds"], record["scores"])
    return features, record


def candidate_features(model: ModelSpec, rows: RankRows, layers: str | list[int] = "last"
                       ) -> tuple[np.ndarray, np.ndarray | None]:
    """A scored candidate's features and source probabilities again, for assembling the ranking in another process
    than the one that scored it: from the feature cache (extracted again only if the cache lost them), transformed
    as when it was scored (rows.transform)."""
    from workers.ranking.softdecay import apply_feature_transform

    result, _ = model_features(model, rows.examples, **rows.extraction)
    features = np.asarray(result.select(layers), dtype=np.float64)
    return apply_feature_transform(features, rows.transform), result.source_probs


def assemble_ranking(dataset: DatasetSpec, models: list[ModelSpec], rows: RankRows,
                     per_model: dict[str, dict[str, Any]], features_by_model: dict[str, np.ndarray],
                     metrics: list[str], *, bootstrap_samples: int = 200, seed: int = 0,
                     progress: Progress | None = None) -> FullRanking:
    """The ranking of scored candidates by the first metric; every score comes with an interval and, against the
    next model down, the probability that the higher-ranked one is really better (paired bootstrap over rows). Also
    the verdict (workers.ranking.verdict): what the ranking lets a user conclude, and the feature map
    (workers.projection): each scored model's features in 2-D, coloured by the labels as uploaded.
    per_model: each candidate's record (score_candidate's); features_by_model: those that were scored."""
    from workers.projection import feature_map
    from workers.ranking import prior_only_evidence

    report = progress or (lambda stage, fraction: None)
    labels = rows.labels
    failures = {m.name: per_model[m.id]["details"]["error"] for m in models if "error" in per_model[m.id]["details"]}
    if len(failures) == len(models):
        raise CandidatesFailed(failures)
    report("scoring", 0.9)
    primary = metrics[0]
    # highest first; a model without a primary score (not applicable, or failed) after every scored one
    order = sorted(models, key=lambda m: np.inf if per_model[m.id]["scores"][primary] is None
                   else -per_model[m.id]["scores"][primary])
    num_classes = len(dataset.label_names or []) if dataset.task == "classification" else None
    uncertainty = _uncertainty(order, per_model, features_by_model, metrics, labels, dataset.task,
                               num_classes=num_classes, bootstrap_samples=bootstrap_samples, seed=seed)
    prior = prior_only_evidence(labels, dataset.task) if "logme" in metrics else None
    ranked = [_ranked_model(position, model, per_model[model.id], uncertainty, prior)
              for position, model in enumerate(order, start=1)]
    verdict = ranking_verdict_for(ranked, metrics[0], uncertainty["replicates"], prior, len(rows.examples))
    projected = feature_map({m.id: features_by_model[m.id] for m in order if m.id in features_by_model},
                            {m.id: m.name for m in models}, rows.raw_labels, dataset.task, dataset.label_names,
                            seed=seed)
    report("ranked", 1.0)
    return FullRanking(ranked, verdict, projected)


def _score_candidate(model: ModelSpec, stage: str, where: tuple[float, float], examples: Examples,
                     labels: np.ndarray, task: str, metrics: list[str], report: Progress,
                     extraction: dict[str, Any], layers: str | list[int] = "last",
                     transform: dict[str, Any] | None = None) -> tuple[np.ndarray | None, dict[str, Any]]:
    """One candidate's features (None if it failed) and its ranking record: scores, notes, timings, details.
    where: (start, span) of its extraction on the progress scale; layers: which hidden states it is read at
    (FeatureResult.select); transform: the job's feature_transform of the selected features."""
    from workers.ranking.softdecay import apply_feature_transform

    start, span = where
    report(stage, start)
    began = time.perf_counter()
    interrupted: list[BaseException] = []  # raised by the progress callback: cancel, lost lease

    def on_batch(done: int, total: int) -> None:
        try:
            report(stage, start + span * done / max(total, 1))
        except BaseException as exc:
            interrupted.append(exc)
            raise

    try:
        result, from_cache = model_features(model, examples, on_batch=on_batch, **extraction)
        selected = result.select(layers)
    except Exception as exc:
        if interrupted:
            raise
        # One unusable candidate (no tokenizer, not a text model, out of memory) must not sink the others.
        log.warning("model %s (%s) failed: %r", model.name, model.id, exc, extra={"model_id": model.id})
        return None, failed_model(metrics, exc, len(examples), time.perf_counter() - began)
    features = apply_feature_transform(np.asarray(selected, dtype=np.float64), transform)
    scores, scoring = score_model(metrics, features, labels, task, result.source_probs)
    return features, {
        "scores": scores, "notes": scoring["notes"], "score_seconds": scoring["score_seconds"],
        "source_probs": result.source_probs,
        "feature_seconds": 0.0 if from_cache else float(result.total_seconds),
        "details": {"feature_dim": int(features.shape[1]), "rows": len(examples), "features_cached": from_cache,
                    "parameters": int(result.num_parameters),
                    "forward_seconds": 0.0 if from_cache else float(result.forward_seconds),
                    "wall_seconds": time.perf_counter() - began},
    }


def _uncertainty(order: list[ModelSpec], per_model: dict[str, dict[str, Any]],
                 features_by_model: dict[str, np.ndarray], metrics: list[str], labels: np.ndarray, task: str, *,
                 num_classes: int | None, bootstrap_samples: int, seed: int) -> dict[str, Any]:
    """Per metric, the paired bootstrap over the models it scored: {"intervals": {model: {metric: [lo, hi]}},
    "p_better": {model: {metric: P(better than the next one down)}}, "resamples": {metric: count}}."""
    intervals: dict[str, dict[str, list[float]]] = {m.id: {} for m in order}
    p_better: dict[str, dict[str, float | None]] = {m.id: {} for m in order}
    resamples: dict[str, int] = {}
    replicates: dict[str, np.ndarray] | None = None  # the first (ranking) estimator's, for the verdict
    for metric in metrics:
        # LEEP/NCE read the model's own head; the others read its features.
        source = "source_probs" if metric in ("leep", "nce") else None
        scored = {m.id: per_model[m.id][source] if source else features_by_model[m.id] for m in order
                  if per_model[m.id]["scores"][metric] is not None}
        if not scored or bootstrap_samples <= 0:
            continue

        slowest = max(per_model[model_id]["score_seconds"][metric] for model_id in scored)
        boot, n_boot = bootstrap_metric(metric, scored, labels, task, num_classes=num_classes,
                                        requested=bootstrap_samples, point_seconds=slowest, seed=seed)
        resamples[metric] = n_boot
        if metric == metrics[0]:
            replicates = boot["replicates"]
        for model_id, interval in boot["intervals"].items():
            intervals[model_id][metric] = [float(interval[0]), float(interval[1])]
        for model_id, probability in boot["p_better_than_next"].items():
            p_better[model_id][metric] = None if probability is None else float(probability)
    return {"intervals": intervals, "p_better": p_better, "resamples": resamples, "replicates": replicates}


def _ranked_model(position: int, model: ModelSpec, info: dict[str, Any], uncertainty: dict[str, Any],
                  prior: float | None) -> RankedModel:
    details = dict(info["details"], intervals=uncertainty["intervals"][model.id],
                   p_better_than_next=uncertainty["p_better"][model.id], bootstrap_resamples=uncertainty["resamples"],
                   score_seconds=info["score_seconds"])
    if info["notes"]:
        details["notes"] = info["notes"]
    if prior is not None:
        logme_score = info["scores"].get("logme")
        details["logme_prior_only"] = float(prior)
        details["beats_prior"] = bool(logme_score is not None and logme_score > prior)
    return RankedModel(model.id, model.name, position, info["scores"], info["feature_seconds"], details)


def ranking_verdict_for(ranked: list[RankedModel], estimator: str, replicates: dict[str, np.ndarray] | None,
                        prior: float | None, rows: int, behind: dict[str, float] | None = None) -> dict[str, Any]:
    """The verdict of a ranking (workers.ranking.verdict); the static baseline reads each entry's `parameters`
    (the loaded model's, as its feature extraction counted them; None for a model that failed).
    behind: P(top better) of models already known to be behind it (successive halving's eliminated ones)."""
    from workers.ranking.verdict import ranking_verdict

    parameters = {r.model_id: r.details.get("parameters") for r in ranked}
    return ranking_verdict([r.model_id for r in ranked], {r.model_id: r.name for r in ranked}, estimator,
                           replicates, {r.model_id: r.scores for r in ranked}, prior, parameters, rows,
                           behind=behind)

"""Successive halving for ranking many candidates on big data: score every candidate on a small stratified sample,
drop the ones that are confidently behind the leader, grow the sample for the rest, repeat.

Samples are nested (each round's rows contain the previous round's), so a surviving model's features of earlier
rows are reused: each round extracts only the new rows, cached under a key that names exactly those rows.
"Confidently behind" is a paired bootstrap (the same resampled rows for every model, `bootstrap_scores`):
P(leader > candidate) is the fraction of replicates in which the leader scores above the candidate.

Caveats: the bootstrap measures sampling noise only. A score whose expectation moves with N (LogME's Occam
penalty grows for wide features on few rows) can put a model confidently behind at N=256 that leads at N=2000; start
with enough rows for the widest candidate, or use "logme_projected". With many candidates and rounds the chance of
one wrong elimination adds up; confidence is per comparison, not family-wise.

Pure pipeline code like workers/pipeline.py: no database, no Celery.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workers import sampling
from workers.pipeline import (
    CandidatesFailed,
    DatasetSpec,
    Examples,
    ModelSpec,
    Progress,
    RankedModel,
    bootstrap_metric,
    describe_failure,
    examples_digest,
    load_dataset,
    model_features,
    ranking_targets,
    ranking_verdict_for,
)


@dataclass
class HalvingRound:
    index: int  # 0-based
    rows: int  # sample size scored in this round
    new_rows: int  # rows whose features were extracted in this round (per surviving model)
    survivors: list[str]  # model ids scored in this round
    eliminated: list[str]  # model ids dropped after this round
    leader: str | None
    scores: dict[str, float | None]  # point score of each model scored
    p_leader_better: dict[str, float]  # paired bootstrap P(leader > model), for models other than the leader
    seconds: float  # wall time of the round (extraction + scoring)
    forward_seconds: float  # forward passes of this round (0 for cache hits)
    row_indices: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0, dtype=np.int64))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("row_indices")
        return out


@dataclass
class HalvingResult:
    ranking: list[RankedModel]
    rounds: list[HalvingRound]
    metric: str
    total_rows: int  # rows in the dataset
    forward_seconds: float  # all forward passes (0 for cache hits)
    extraction_seconds: float  # loading + tokenising + forward, all models and rounds
    rows_models: int  # feature rows extracted, summed over models (cache hits excluded)
    rows_models_full: int  # what a full ranking extracts: total_rows x number of models
    seconds: float  # wall time of the whole call
    verdict: dict[str, Any] = field(default_factory=dict)  # workers.ranking.verdict, on the last round's rows
    feature_map: dict[str, Any] = field(default_factory=dict)  # workers.projection: the last round's models, rows

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "total_rows": self.total_rows, "forward_seconds": self.forward_seconds,
                "extraction_seconds": self.extraction_seconds, "rows_models": self.rows_models,
                "rows_models_full": self.rows_models_full, "seconds": self.seconds,
                "rounds": [r.to_dict() for r in self.rounds], "ranking": [asdict(r) for r in self.ranking]}


def nested_order(labels: np.ndarray, task: str, seed: int) -> np.ndarray:
    """A permutation of all rows whose every prefix is a (near) stratified sample, by class for classification
    (workers.sampling.nested_order): taking prefixes of one permutation makes the samples nested by construction."""
    return sampling.nested_order(labels, seed, stratify=task == "classification")


def round_sizes(n: int, initial_rows: int, growth: float) -> list[int]:
    """initial_rows, ×growth, ... capped at n; the last size is n."""
    sizes = [min(n, max(1, initial_rows))]
    while sizes[-1] < n:
        sizes.append(min(n, max(sizes[-1] + 1, math.ceil(sizes[-1] * growth))))
    return sizes


def paired_elimination(point: dict[str, float], replicates: dict[str, np.ndarray], confidence: float,
                       min_models: int = 1) -> tuple[str, dict[str, float], list[str]]:
    """Leader (highest point score), P(leader > model) per other model from paired replicates (ties count 1/2),
    and the models to drop: those with P >= confidence, keeping at least min_models (the best-scoring of the
    would-be-dropped stay). confidence >= 1 drops nothing: a finite bootstrap cannot establish certainty."""
    ranked = sorted(point, key=lambda m: point[m], reverse=True)
    leader = ranked[0]
    p_better: dict[str, float] = {}
    for model in ranked[1:]:
        diff = replicates[leader] - replicates[model]
        p_better[model] = float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))
    if confidence >= 1.0:
        return leader, p_better, []
    behind = [m for m in ranked[1:] if p_better[m] >= confidence]  # in score order, best first
    keep_extra = max(0, min_models - (len(ranked) - len(behind)))
    return leader, p_better, behind[keep_extra:]


# Features of a round extracted elsewhere (other workers) into the feature cache before the round reads them:
# (round, its survivors, the round's new examples, their cache tag, (start, width) of the round's extraction on the
# progress scale) -> {model id: round_features' record}.
Prefetch = Callable[[int, list[ModelSpec], Examples, str, tuple[float, float]], dict[str, dict[str, Any]]]


def halving_plan(labels: np.ndarray, task: str, initial_rows: int, growth: float, seed: int
                 ) -> tuple[np.ndarray, list[int]]:
    """The nested row order and the round sizes of a successive-halving ranking of these labels."""
    first = max(initial_rows, len(np.unique(labels)) if task == "classification" else 2)
    return nested_order(labels, task, seed), round_sizes(len(labels), first, growth)


def round_examples(dataset: DatasetSpec, round_index: int, *, initial_rows: int = 256, growth: float = 2.0,
                   seed: int = 0) -> tuple[Examples, str]:
    """The examples whose features a round extracts (those new to it) and their cache tag, as the ranking reads
    them: what another worker needs to extract them for it."""
    examples, labels = load_dataset(dataset)
    order, sizes = halving_plan(labels, dataset.task, initial_rows, growth, seed)
    new_rows = order[sizes[round_index - 1] if round_index else 0:sizes[round_index]]
    new_examples = [examples[i] for i in new_rows]
    return new_examples, examples_digest(new_examples)


def round_features(model: ModelSpec, examples: Examples, tag: str, extraction: dict[str, Any],
                   layers: str | list[int] = "last") -> dict[str, Any]:
    """Extract (or find cached) one model's features of a round's new examples: their timings, or the error that
    drops the model."""
    try:
        result, from_cache = model_features(model, examples, tag, **extraction)
        result.select(layers)
    except Exception as exc:  # one unusable candidate must not sink the others
        return {"error": describe_failure(exc)}
    return {"computed": not from_cache, "forward_seconds": float(result.forward_seconds),
            "total_seconds": float(result.total_seconds)}


def rank_successive_halving(dataset: DatasetSpec, models: list[ModelSpec], metric: str = "logme", *,
                            initial_rows: int = 256, growth: float = 2.0, confidence: float = 0.95,
                            min_models: int = 1, seed: int = 0, cache_root: Path, hf_cache_dir: Path,
                            max_length: int = 128, batch_size: int = 32, device: str | None = None,
                            bootstrap_samples: int = 200, progress: Progress | None = None,
                            pooling: str = "mean", layers: str | list[int] = "last",
                            prefetch: Prefetch | None = None, feature_transform: dict[str, Any] | None = None
                            ) -> HalvingResult:
    """Rank `models` for `dataset` by `metric`, eliminating candidates confidently behind the leader on growing
    nested samples (initial_rows, ×growth, ... up to all rows) until the full data are scored or at most
    min_models remain.

    Ranking: survivors by their score on the largest sample scored (with that round's bootstrap interval and
    P(better than the next survivor)), then eliminated models, later eliminations first (within a round by score),
    each with the round and sample size at which it was dropped. With confidence >= 1 nothing is dropped and the
    last round scores all rows in dataset order with `seed`, so the ranking is that of `pipeline.rank`.
    prefetch: extracts each round's features elsewhere first (the service's workers); None: here.
    feature_transform: applied to each round's N x D features of the rows seen so far before they are scored.
    """
    if not models:
        raise ValueError("no candidate models")
    if growth <= 1.0:
        raise ValueError("growth must be > 1")
    if not 0.0 < confidence <= 1.0:
        raise ValueError("confidence must be in (0, 1]")
    if min_models < 1:
        raise ValueError("min_models must be >= 1")
    if bootstrap_samples < 1:
        raise ValueError("successive halving eliminates by bootstrap: bootstrap_samples must be >= 1")
    began = time.perf_counter()
    examples, labels = load_dataset(dataset)
    n = len(examples)
    order, sizes = halving_plan(labels, dataset.task, initial_rows, growth, seed)
    run = _Halving(models, metric, dataset, examples, labels, order=order, sizes=sizes,
                   report=progress or (lambda stage, fraction: None), prefetch=prefetch,
                   extraction=dict(cache_root=cache_root, hf_cache_dir=hf_cache_dir, max_length=max_length,
                                   batch_size=batch_size, device=device, pooling=pooling),
                   layers=layers, transform=feature_transform,
                   elimination=dict(confidence=confidence, min_models=min_models, seed=seed,
                                    bootstrap_samples=bootstrap_samples))
    run.run()
    ranking = _final_ranking(models, run.survivors, run.last_scores, run.last_boot, run.dropped, run.rounds, metric,
                             run.prior, run.feature_seconds)
    for entry in ranking:
        entry.details["parameters"] = run.parameters.get(entry.model_id)
    # an eliminated model is behind by that round's paired bootstrap
    behind = {m: float(info["p_leader_better"]) for m, info in run.dropped.items() if "p_leader_better" in info}
    verdict = ranking_verdict_for(ranking, metric, run.last_boot.get("replicates"), run.prior, run.rounds[-1].rows,
                                  behind=behind)
    run.report("ranked", 1.0)
    return HalvingResult(ranking=ranking, rounds=run.rounds, metric=metric, total_rows=n,
                         forward_seconds=run.total_forward, extraction_seconds=run.total_extraction,
                         rows_models=run.rows_models, rows_models_full=n * len(models),
                         seconds=time.perf_counter() - began, verdict=verdict,
                         feature_map=run.feature_map(dataset.label_names))


class _Halving:
    """One successive-halving ranking: the survivors, their feature chunks, the rounds so far and why each dropped
    model left. Per model, chunk r holds the features of rows order[sizes[r-1]:sizes[r]] (and its source head's
    probabilities, for LEEP/NCE)."""

    def __init__(self, models: list[ModelSpec], metric: str, dataset: DatasetSpec, examples: Examples,
                 labels: np.ndarray, *, order: np.ndarray, sizes: list[int], report: Progress,
                 extraction: dict[str, Any], elimination: dict[str, Any],
                 layers: str | list[int] = "last", prefetch: Prefetch | None = None,
                 transform: dict[str, Any] | None = None) -> None:
        self.by_id = {m.id: m for m in models}
        self.prefetch = prefetch
        self.metric, self.task, self.examples, self.labels = metric, dataset.task, examples, labels
        self.num_classes = len(dataset.label_names or []) if dataset.task == "classification" else None
        self.order, self.sizes, self.report, self.extraction = order, sizes, report, extraction
        self.layers, self.transform = layers, transform
        self.confidence, self.min_models = elimination["confidence"], elimination["min_models"]
        self.seed, self.bootstrap_samples = elimination["seed"], elimination["bootstrap_samples"]
        self.chunks: dict[str, list[np.ndarray]] = {m.id: [] for m in models}
        self.prob_chunks: dict[str, list[np.ndarray | None]] = {m.id: [] for m in models}
        self.total_forward = self.total_extraction = 0.0
        self.rows_models = 0
        self.feature_seconds: dict[str, float] = {m.id: 0.0 for m in models}
        self.parameters: dict[str, int] = {}  # as each model's feature extraction counted them
        self.prior: float | None = None
        self.survivors = [m.id for m in models]
        self.rounds: list[HalvingRound] = []
        self.last_boot: dict[str, Any] = {}
        self.last_scores: dict[str, float | None] = {}
        self.dropped: dict[str, dict[str, Any]] = {}  # model id -> when and why it left
        self.worst_case = float(len(examples) * len(models))
        self.done_units = 0

    def run(self) -> None:
        n = len(self.examples)
        for r, size in enumerate(self.sizes):
            round_began = time.perf_counter()
            new_rows, round_forward = self.extract(r, size)
            seen = self.order[:size]
            scores, values, round_labels = self.score(r, size, seen)
            # a metric that does not apply to a model (e.g. LEEP without a source head) cannot rank it: drop it
            not_applicable = [m for m in self.survivors if scores[m] is None]
            for model_id in not_applicable:
                self.dropped[model_id] = {"round": r, "rows": size, "reason": "not applicable", "score": None,
                                          "prior": self.prior}
            self.report(f"round {r + 1}/{len(self.sizes)}: scoring {len(values)} models on {size} rows",
                        min(0.99, self.done_units / self.worst_case))
            leader, p_leader, eliminated = self.eliminate(r, size, scores, values, round_labels)
            gone = set(eliminated) | set(not_applicable)
            self.rounds.append(HalvingRound(
                index=r, rows=size, new_rows=new_rows, survivors=list(self.survivors),
                eliminated=eliminated + not_applicable, leader=leader, scores=scores, p_leader_better=p_leader,
                seconds=time.perf_counter() - round_began, forward_seconds=round_forward, row_indices=np.sort(seen)))
            self.survivors = [m for m in self.survivors if m not in gone]
            for model_id in gone:  # free the features of models that are out
                self.chunks[model_id], self.prob_chunks[model_id] = [], []
            if size >= n or len(self.survivors) <= self.min_models:
                break

    def feature_map(self, label_names: list[str] | None) -> dict[str, Any]:
        """The 2-D map (workers.projection) of the models scored in the last round, on that round's rows: the
        features of eliminated models are freed as they leave."""
        from workers.projection import feature_map

        seen = self.order[:self.rounds[-1].rows]
        ascending = np.argsort(seen, kind="stable")  # dataset order, as score() reads them: on all rows, rank()'s map
        best_first = sorted(self.last_scores, key=lambda m: -float(self.last_scores[m]))  # type: ignore[arg-type]
        alive = {m: self._features(m, ascending) for m in best_first if self.chunks[m]}
        return feature_map(alive, {m: model.name for m, model in self.by_id.items()}, self.labels[seen[ascending]],
                           self.task, label_names, seed=self.seed)

    def extract(self, r: int, size: int) -> tuple[int, float]:
        """Features of the round's new rows for every survivor; (new rows, forward seconds of the round)."""
        from workers.features import TokenIdsCache

        new_rows = self.order[self.sizes[r - 1] if r else 0:size]
        new_examples = [self.examples[i] for i in new_rows]
        token_ids = TokenIdsCache(len(new_examples))
        tag = examples_digest(new_examples)
        round_forward = 0.0
        failed_now: list[str] = []
        elsewhere = self._prefetched(r, new_examples, tag)
        for k, model_id in enumerate(self.survivors):
            model = self.by_id[model_id]
            stage = (f"round {r + 1}/{len(self.sizes)} ({size} rows), features {k + 1}/{len(self.survivors)}: "
                     f"{model.name}")
            self.report(stage, min(0.99, self.done_units / self.worst_case))
            try:
                if "error" in elsewhere.get(model_id, {}):
                    raise RuntimeError(elsewhere[model_id]["error"])
                result, from_cache = model_features(model, new_examples, tag, token_ids=token_ids, **self.extraction)
                selected = result.select(self.layers)
            except Exception as exc:  # one unusable candidate must not sink the others (see pipeline.rank)
                error = elsewhere.get(model_id, {}).get("error") or describe_failure(exc)
                self.dropped[model_id] = {"round": r, "rows": size, "reason": "failed", "error": error,
                                          "score": None, "prior": None}
                failed_now.append(model_id)
                continue
            if from_cache and elsewhere.get(model_id, {}).get("computed"):  # extracted for this round elsewhere
                result.forward_seconds = elsewhere[model_id]["forward_seconds"]
                result.total_seconds = elsewhere[model_id]["total_seconds"]
                from_cache = False
            self.chunks[model_id].append(np.asarray(selected))  # float32 until scored: half the memory
            self.prob_chunks[model_id].append(result.source_probs)
            self.parameters[model_id] = int(result.num_parameters)
            self.done_units += len(new_rows)
            if not from_cache:
                round_forward += float(result.forward_seconds)
                self.total_extraction += float(result.total_seconds)
                self.feature_seconds[model_id] += float(result.total_seconds)
                self.rows_models += len(new_rows)
        self.total_forward += round_forward
        self.survivors = [m for m in self.survivors if m not in failed_now]
        if not self.survivors:
            raise CandidatesFailed({self.by_id[m].name: d["error"] for m, d in self.dropped.items()
                                    if d["reason"] == "failed"})
        return len(new_rows), round_forward

    def _prefetched(self, r: int, new_examples: Examples, tag: str) -> dict[str, dict[str, Any]]:
        if self.prefetch is None:
            return {}
        width = len(new_examples) * len(self.survivors) / self.worst_case
        return self.prefetch(r, [self.by_id[m] for m in self.survivors], new_examples, tag,
                             (min(0.99, self.done_units / self.worst_case), width))

    def score(self, r: int, size: int, seen: np.ndarray
              ) -> tuple[dict[str, float | None], dict[str, np.ndarray], np.ndarray]:
        """Every survivor scored on the rows seen so far, in dataset order (the full round is then exactly
        rank()'s input): (scores, what the bootstrap resamples for each scored model, the round's targets)."""
        from workers.ranking import prior_only_evidence, score_estimator

        metric, task = self.metric, self.task
        ascending = np.argsort(seen, kind="stable")
        round_labels = ranking_targets(self.labels[seen[ascending]], task)
        if metric == "logme":
            self.prior = prior_only_evidence(round_labels, task)
        values: dict[str, np.ndarray] = {}
        scores: dict[str, float | None] = {}
        for model_id in self.survivors:
            features = self._features(model_id, ascending)
            probs = self.prob_chunks[model_id]
            source = None if any(p is None for p in probs) else np.concatenate(probs)[ascending]  # type: ignore[arg-type]
            value = score_estimator(metric, features, round_labels, task, source_probs=source)
            scores[model_id] = None if value is None else float(value)
            if value is not None:
                values[model_id] = source if metric in ("leep", "nce") else features
        return scores, values, round_labels

    def _features(self, model_id: str, ascending: np.ndarray) -> np.ndarray:
        """A survivor's features of the rows seen so far in dataset order, transformed (the job's
        feature_transform: on this round's N x D matrix)."""
        from workers.ranking.softdecay import apply_feature_transform

        features = np.concatenate(self.chunks[model_id])[ascending].astype(np.float64)
        return apply_feature_transform(features, self.transform)

    def eliminate(self, r: int, size: int, scores: dict[str, float | None], values: dict[str, np.ndarray],
                  round_labels: np.ndarray) -> tuple[str | None, dict[str, float], list[str]]:
        """(leader, P(leader better) per other model, the models confidently behind) by the paired bootstrap."""
        if not values:
            return None, {}, []
        # point_seconds 0: the refitted estimators get the plain resample cap, not a time budget
        boot, _ = bootstrap_metric(self.metric, values, round_labels, self.task, num_classes=self.num_classes,
                                   requested=self.bootstrap_samples, point_seconds=0.0, seed=self.seed)
        point = {m: float(scores[m]) for m in values}  # type: ignore[arg-type]
        leader, p_leader, eliminated = paired_elimination(point, boot["replicates"], self.confidence,
                                                          self.min_models)
        self.last_boot, self.last_scores = boot, {m: scores[m] for m in values}
        for model_id in eliminated:
            self.dropped[model_id] = {"round": r, "rows": size, "reason": "confidently behind the leader",
                                      "score": scores[model_id], "p_leader_better": p_leader[model_id],
                                      "leader": leader, "interval": list(boot["intervals"][model_id]),
                                      "prior": self.prior}
        return leader, p_leader, eliminated


def _final_ranking(models: list[ModelSpec], survivors: list[str], last_scores: dict[str, float | None],
                   last_boot: dict[str, Any], dropped: dict[str, dict[str, Any]], rounds: list[HalvingRound],
                   metric: str, last_prior: float | None, feature_seconds: dict[str, float]) -> list[RankedModel]:
    by_id = {m.id: m for m in models}
    last_rows = rounds[-1].rows
    alive = sorted((m for m in survivors if m in last_scores), key=lambda m: -float(last_scores[m]))  # type: ignore[arg-type]
    # later eliminations first; within one round by the score they had there; not-applicable ones last
    unscored = ("not applicable", "failed")
    out = sorted((m for m in dropped if dropped[m]["reason"] not in unscored),
                 key=lambda m: (-dropped[m]["round"], -float(dropped[m]["score"])))
    out += [m for m in dropped if dropped[m]["reason"] == "not applicable"]
    out += [m for m in dropped if dropped[m]["reason"] == "failed"]

    ranked: list[RankedModel] = []
    intervals = last_boot.get("intervals", {})
    p_next = last_boot.get("p_better_than_next", {})
    for position, model_id in enumerate(alive + out, start=1):
        model = by_id[model_id]
        if model_id in dropped:
            info = dropped[model_id]
            details: dict[str, Any] = {"eliminated": True, "eliminated_round": info["round"],
                                       "eliminated_at_rows": info["rows"], "rows": info["rows"],
                                       "reason": info["reason"]}
            if info["reason"] == "failed":
                details["error"] = info["error"]
            elif info["reason"] != "not applicable":
                details.update(intervals={metric: info["interval"]}, p_leader_better=info["p_leader_better"],
                               leader=info["leader"])
            score, prior = info["score"], info["prior"]
        else:
            details = {"eliminated": False, "rows": last_rows,
                       "intervals": {metric: [float(v) for v in intervals[model_id]]} if model_id in intervals else {}}
            score, prior = last_scores[model_id], last_prior
        if model_id in last_scores:  # scored in the last round: P(better than the next one down), as rank() gives
            details["p_better_than_next"] = {metric: float(p_next[model_id])} if model_id in p_next else {}
        if prior is not None:  # the label-prior-only LogME on the same rows (see pipeline.rank)
            details["logme_prior_only"] = float(prior)
            details["beats_prior"] = bool(score is not None and score > prior)
        ranked.append(RankedModel(model_id, model.name, position, {metric: score}, feature_seconds[model_id],
                                  details))
    return ranked

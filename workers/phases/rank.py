"""The rank phase: score every candidate on the dataset (all rows, a sample, or by successive halving).

In the service a rank job without successive halving is fanned out: each candidate is scored by whichever worker
claims it (score_one), and the ranking is assembled once from every candidate's record (assemble). run_rank does
the whole job in one process (successive halving, benchmarks, notebooks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workers import pipeline
from workers.halving import Prefetch, rank_successive_halving, round_examples, round_features
from workers.phases.inputs import RankInput


@dataclass
class RankOutcome:
    ranking: list[pipeline.RankedModel]  # best first
    summary: dict[str, Any]  # ranked_by, verdict, feature_map (all rows or a sample); successive halving's rounds


def _extraction(job: RankInput) -> dict[str, Any]:
    options = job.options
    return dict(cache_root=job.features.cache_root, hf_cache_dir=job.features.hf_cache_dir,
                seed=options.get("seed", 0), max_length=job.features.max_length,
                pooling=options.get("pooling", "mean"), batch_size=job.features.batch_size,
                device=job.features.device)


def run_rank(job: RankInput, progress: pipeline.Progress, prefetch: Prefetch | None = None) -> RankOutcome:
    """Rank `job.models` by `job.metrics[0]`; `progress(stage, fraction)` may raise to stop (cancel, lost lease).
    prefetch: successive halving's rounds' features extracted by other workers first (workers.halving)."""
    options = job.options
    common: dict[str, Any] = dict(_extraction(job), layers=options.get("layers", "last"),
                                  feature_transform=feature_transform(job), bootstrap_samples=job.bootstrap_samples,
                                  progress=progress)
    halving = options.get("successive_halving")
    if not halving:
        full = pipeline.rank_in_full(job.dataset, job.models, job.metrics, sample_size=options.get("sample_size"),
                                     **common)
        return RankOutcome(ranking=full.ranked, summary={"ranked_by": ranked_by(job), "verdict": full.verdict,
                                                         "feature_map": full.feature_map})
    result = rank_successive_halving(job.dataset, job.models, job.metrics[0], **halving, **common, prefetch=prefetch)
    summary = {key: value for key, value in result.to_dict().items() if key != "ranking"}
    summary.update(mode="successive_halving", ranked_by=ranked_by(job), verdict=result.verdict,
                   feature_map=result.feature_map)
    return RankOutcome(ranking=result.ranking, summary=summary)


def feature_transform(job: RankInput) -> dict[str, Any] | None:
    """The job's feature_transform as workers.ranking.softdecay.apply_feature_transform takes it; None: none."""
    if job.options.get("feature_transform", "none") == "none":
        return None
    return {"name": job.options["feature_transform"], "alpha": job.options["softdecay_alpha"]}


def ranked_by(job: RankInput) -> dict[str, Any]:
    """What ordered the ranking: the estimator and the features it read."""
    return {"estimator": job.metrics[0], "features": {"pooling": job.options.get("pooling", "mean"),
                                                      "layers": job.options.get("layers", "last"),
                                                      "transform": feature_transform(job) or "none"}}


def job_rows(job: RankInput) -> pipeline.RankRows:
    """The rows every candidate of `job` is scored on (the same in every worker: the sample is seeded)."""
    return pipeline.prepare_rows(job.dataset, sample_size=job.options.get("sample_size"),
                                 feature_transform=feature_transform(job), **_extraction(job))


def score_one(job: RankInput, rows: pipeline.RankRows, model: pipeline.ModelSpec, stage: str,
              where: tuple[float, float], progress: pipeline.Progress
              ) -> tuple[tuple[Any, Any] | None, dict[str, Any]]:
    """One candidate's (features, source probabilities), None if it failed, and its ranking record as JSON (the
    arrays stay in the feature cache, where `assemble` finds them in any worker)."""
    features, record = pipeline.score_candidate(model, stage, where, rows, job.dataset.task, job.metrics, progress,
                                                job.options.get("layers", "last"))
    source_probs = record.pop("source_probs", None)
    return (None if features is None else (features, source_probs)), record


def assemble(job: RankInput, rows: pipeline.RankRows, records: dict[str, dict[str, Any]],
             progress: pipeline.Progress, known_features: dict[str, Any] | None = None) -> RankOutcome:
    """The ranking of candidates scored anywhere, from their records and their cached features. A record without
    scores is a candidate that failed (its error in its details). known_features: (features, source probabilities)
    of candidates this process scored, which need not be read back."""
    known = known_features or {}
    layers = job.options.get("layers", "last")
    per_model: dict[str, dict[str, Any]] = {}
    features_by_model: dict[str, Any] = {}
    for model in job.models:
        record = records[model.id]
        if "scores" not in record:  # given up by the lease state machine (service.candidates)
            base = pipeline.failed_model(job.metrics, RuntimeError(), len(rows.examples), 0.0)
            record = dict(base, details=dict(base["details"], **record.get("details", {})))
        per_model[model.id] = dict(record, source_probs=None)
        if "error" not in record["details"]:
            features_by_model[model.id], per_model[model.id]["source_probs"] = (
                known.get(model.id) or pipeline.candidate_features(model, rows, layers))
    full = pipeline.assemble_ranking(job.dataset, job.models, rows, per_model, features_by_model, job.metrics,
                                     bootstrap_samples=job.bootstrap_samples, seed=job.options.get("seed", 0),
                                     progress=progress)
    return RankOutcome(ranking=full.ranked, summary={"ranked_by": ranked_by(job), "verdict": full.verdict,
                                                     "feature_map": full.feature_map})


def halving_round(job: RankInput, round_index: int) -> tuple[pipeline.Examples, str]:
    """A successive-halving round's new examples and their cache tag (what its candidates extract)."""
    halving = job.options["successive_halving"]
    return round_examples(job.dataset, round_index, initial_rows=halving.get("initial_rows", 256),
                          growth=halving.get("growth", 2.0), seed=job.options.get("seed", 0))


def extract_for_round(job: RankInput, model: pipeline.ModelSpec, examples: pipeline.Examples, tag: str
                      ) -> dict[str, Any]:
    """One model's features of a round's new examples into the feature cache (workers.halving.round_features)."""
    extraction = {k: v for k, v in _extraction(job).items() if k != "seed"}
    return round_features(model, examples, tag, extraction, job.options.get("layers", "last"))

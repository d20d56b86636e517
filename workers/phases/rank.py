"""The rank phase: score every candidate on the dataset (all rows, a sample, or by successive halving)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workers import pipeline
from workers.halving import rank_successive_halving
from workers.phases.inputs import RankInput


@dataclass
class RankOutcome:
    ranking: list[pipeline.RankedModel]  # best first
    summary: dict[str, Any]  # ranked_by, verdict, feature_map (all rows or a sample); successive halving's rounds


def run_rank(job: RankInput, progress: pipeline.Progress) -> RankOutcome:
    """Rank `job.models` by `job.metrics[0]`; `progress(stage, fraction)` may raise to stop (cancel, lost lease)."""
    options = job.options
    common: dict[str, Any] = dict(
        cache_root=job.features.cache_root, hf_cache_dir=job.features.hf_cache_dir, seed=options.get("seed", 0),
        max_length=job.features.max_length, pooling=options.get("pooling", "mean"),
        layers=options.get("layers", "last"),
        batch_size=job.features.batch_size, device=job.features.device, bootstrap_samples=job.bootstrap_samples,
        progress=progress)
    halving = options.get("successive_halving")
    if not halving:
        full = pipeline.rank_in_full(job.dataset, job.models, job.metrics, sample_size=options.get("sample_size"),
                                     **common)
        return RankOutcome(ranking=full.ranked, summary={"ranked_by": ranked_by(job), "verdict": full.verdict,
                                                         "feature_map": full.feature_map})
    result = rank_successive_halving(job.dataset, job.models, job.metrics[0], **halving, **common)
    summary = {key: value for key, value in result.to_dict().items() if key != "ranking"}
    summary.update(mode="successive_halving", ranked_by=ranked_by(job), verdict=result.verdict,
                   feature_map=result.feature_map)
    return RankOutcome(ranking=result.ranking, summary=summary)


def ranked_by(job: RankInput) -> dict[str, Any]:
    """What ordered the ranking: the estimator and the features it read."""
    return {"estimator": job.metrics[0], "features": {"pooling": job.options.get("pooling", "mean"),
                                                      "layers": job.options.get("layers", "last")}}

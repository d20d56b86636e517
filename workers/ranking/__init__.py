"""Transferability estimators: pure functions over arrays (no DB, files or HTTP)."""

from workers.ranking.estimators import METRICS, Metric, score_metric
from workers.ranking.logme import (
    LogMEResult,
    ProjectedLogMEResult,
    logme,
    logme_influence,
    logme_loo_terms,
    logme_projected,
    logme_weighted,
    make_targets,
    prior_only_evidence,
)
from workers.ranking.probe import ridge_loo
from workers.ranking.uncertainty import LogMEMetric, RidgeLOOMetric, bootstrap_scores

__all__ = [
    "METRICS",
    "LogMEMetric",
    "LogMEResult",
    "Metric",
    "ProjectedLogMEResult",
    "RidgeLOOMetric",
    "bootstrap_scores",
    "logme",
    "logme_influence",
    "logme_loo_terms",
    "logme_projected",
    "logme_weighted",
    "make_targets",
    "prior_only_evidence",
    "ridge_loo",
    "score_metric",
]

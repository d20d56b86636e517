"""Transferability estimators: pure functions over arrays (no DB, files or HTTP)."""

from workers.ranking.estimators import METRICS, Metric, score_metric
from workers.ranking.logme import (
    LogMEResult,
    ProjectedLogMEResult,
    logme,
    logme_influence,
    logme_projected,
    logme_weighted,
    make_targets,
    prior_only_evidence,
)
from workers.ranking.uncertainty import LogMEMetric, bootstrap_scores

__all__ = [
    "METRICS",
    "LogMEMetric",
    "LogMEResult",
    "Metric",
    "ProjectedLogMEResult",
    "bootstrap_scores",
    "logme",
    "logme_influence",
    "logme_projected",
    "logme_weighted",
    "make_targets",
    "prior_only_evidence",
    "score_metric",
]

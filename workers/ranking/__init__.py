"""Transferability estimators: pure functions over arrays (no DB, files or HTTP).

    logme.py           LogME itself: the spectrum of the features, the evidence, `logme`
    logme_solvers.py   the maximisation of the evidence over alpha / beta (Newton, MacKay)
    logme_variants.py  weighted, influence, leave-one-out, projected and prior-only LogME
    logme_torch.py     the spectrum and posterior means in torch (GPU)
    targets.py         labels to target columns
    probe.py           ridge_loo: leave-one-out quality of a ridge probe
    estimators.py      the other estimators (H-score, LEEP, NCE, NLEEP, GBC, TransRate, SFDA) and the registry
    uncertainty.py     paired bootstrap of the scores
"""

from workers.ranking.estimators import ESTIMATORS, Estimator, score_estimator
from workers.ranking.logme import LogMEResult, logme
from workers.ranking.logme_variants import (
    ProjectedLogMEResult,
    logme_influence,
    logme_loo_terms,
    logme_projected,
    logme_weighted,
    prior_only_evidence,
)
from workers.ranking.probe import ridge_loo
from workers.ranking.targets import make_targets
from workers.ranking.uncertainty import LogMEMetric, RidgeLOOMetric, bootstrap_scores

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "LogMEMetric",
    "LogMEResult",
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
    "score_estimator",
]

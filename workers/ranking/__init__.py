"""Transferability estimators: pure functions over arrays (no DB, files or HTTP)."""

from workers.ranking.logme import LogMEResult, logme, make_targets, prior_only_evidence

__all__ = ["LogMEResult", "logme", "make_targets", "prior_only_evidence"]

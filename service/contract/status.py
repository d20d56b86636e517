"""A job's status and phase, and the transitions between statuses: one table that the state machine in
service/jobs.py follows and tests check."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


class JobPhase(StrEnum):
    """Which Celery task runs the job next: ranking first, then tuning when the job asked for it."""

    RANK = "rank"
    TUNE = "tune"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

# Every status change a job may make, named as service/jobs.py names it.
TRANSITIONS: dict[str, tuple[JobStatus, JobStatus]] = {
    "claim": (JobStatus.QUEUED, JobStatus.RUNNING),
    "take_over_expired": (JobStatus.RUNNING, JobStatus.RUNNING),  # a dead worker's lease, claimed by another
    "cancel_queued": (JobStatus.QUEUED, JobStatus.CANCELLED),
    "next_phase": (JobStatus.RUNNING, JobStatus.QUEUED),  # ranked; queued again to tune
    "requeue_lost": (JobStatus.RUNNING, JobStatus.QUEUED),  # the worker died; another attempt
    "succeed": (JobStatus.RUNNING, JobStatus.SUCCEEDED),
    "fail": (JobStatus.RUNNING, JobStatus.FAILED),
    "cancel_running": (JobStatus.RUNNING, JobStatus.CANCELLED),
}


def allowed(source: JobStatus | str, target: JobStatus | str) -> bool:
    """Whether some named transition takes a job from `source` to `target`."""
    return (JobStatus(source), JobStatus(target)) in TRANSITIONS.values()

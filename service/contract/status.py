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


class CandidateStatus(StrEnum):
    """One candidate of a fanned-out rank job (service.jobs' candidate leases). Scored and failed are both done: a
    failed candidate (it could not be loaded, or its workers kept dying) is ranked last with its error."""

    QUEUED = "queued"
    RUNNING = "running"
    SCORED = "scored"
    FAILED = "failed"

    @property
    def done(self) -> bool:
        return self in (CandidateStatus.SCORED, CandidateStatus.FAILED)


CANDIDATE_TRANSITIONS: dict[str, tuple[CandidateStatus, CandidateStatus]] = {
    "claim": (CandidateStatus.QUEUED, CandidateStatus.RUNNING),
    "take_over_expired": (CandidateStatus.RUNNING, CandidateStatus.RUNNING),
    "give_up_lost": (CandidateStatus.RUNNING, CandidateStatus.FAILED),  # its workers died max_attempts times
    "score": (CandidateStatus.RUNNING, CandidateStatus.SCORED),
    "fail": (CandidateStatus.RUNNING, CandidateStatus.FAILED),
    "release": (CandidateStatus.RUNNING, CandidateStatus.QUEUED),  # its worker stopped without scoring it
}

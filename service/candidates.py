"""The candidates of a fanned-out job step over the job_candidates table: each one is claimed, leased and finished
by one worker, like a job (service/jobs.py), so any worker takes any candidate and a dead worker loses only its own.

A step is named after its phase: "rank" (score each candidate), "rank:halving-<r>" (features of a successive-
halving round), "tune" (train each target). Every change is a compare-and-set UPDATE guarded by the candidate's
token and lease. A candidate is claimed only while its job runs and is not being cancelled; the job's coordinator
(workers/runner.py) goes on once every candidate of the step is done. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.orm import sessionmaker

from service.contract import CandidateStatus, JobStatus
from service.db import Job, JobCandidate, finite_json, utcnow
from service.jobs import JobCancelled, LeaseLost

RANK_STEP, TUNE_STEP = "rank", "tune"


_HALVING_PREFIX = f"{RANK_STEP}:halving-"


def halving_step(round_index: int) -> str:
    return f"{_HALVING_PREFIX}{round_index}"


def halving_round_of(step: str) -> int | None:
    """The round a successive-halving step is of; None for another step."""
    tail = step.removeprefix(_HALVING_PREFIX)
    return int(tail) if tail != step and tail.isdigit() else None


def step_phase(step: str) -> str:
    """The phase ("rank" or "tune") whose queue and workers a step's candidates belong to."""
    return step.split(":", 1)[0]


@dataclass(frozen=True)
class Claimed:
    step: str
    model_id: str


@dataclass(frozen=True)
class CandidateState:
    model_id: str
    position: int
    status: CandidateStatus
    worker: str | None
    attempts: int
    progress: float
    record: dict[str, Any] | None

    @property
    def done(self) -> bool:
        return self.status.done


def open_candidates(sessions: sessionmaker, job_id: str, step: str, model_ids: list[str]) -> None:
    """One queued row per candidate not yet in the table. Rows already there (scored by an earlier attempt of the
    rank phase) are kept: a coordinator that died loses no candidate that was done. Rows of models no longer among
    the candidates (removed from the catalog since) go."""
    with sessions.begin() as session:
        session.execute(delete(JobCandidate).where(JobCandidate.job_id == job_id, JobCandidate.step == step,
                                                   JobCandidate.model_id.notin_(model_ids)))
        present = set(session.execute(select(JobCandidate.model_id).where(
            JobCandidate.job_id == job_id, JobCandidate.step == step)).scalars())
        session.add_all(JobCandidate(job_id=job_id, step=step, model_id=model_id, position=position,
                                     status=CandidateStatus.QUEUED.value, attempts=0, progress=0.0)
                        for position, model_id in enumerate(model_ids) if model_id not in present)


def candidate_states(sessions: sessionmaker, job_id: str, step: str) -> list[CandidateState]:
    """The step's candidates in the job's order."""
    with sessions() as session:
        rows = session.execute(select(JobCandidate).where(JobCandidate.job_id == job_id, JobCandidate.step == step)
                               .order_by(JobCandidate.position)).scalars().all()
        return [CandidateState(r.model_id, r.position, CandidateStatus(r.status), r.worker, r.attempts, r.progress,
                               r.record) for r in rows]


def _claimable(job_id: str, now: Any, step: str | None, phase: str | None):  # type: ignore[no-untyped-def]
    which = [JobCandidate.step == step] if step else \
        [or_(JobCandidate.step == phase, JobCandidate.step.startswith(f"{phase}:"))] if phase else []
    return and_(JobCandidate.job_id == job_id, *which,
                or_(JobCandidate.status == CandidateStatus.QUEUED,
                    and_(JobCandidate.status == CandidateStatus.RUNNING, JobCandidate.lease_expires_at < now)))


def claim_candidate(sessions: sessionmaker, job_id: str, token: str, worker: str, lease_seconds: float,
                    max_attempts: int, *, step: str | None = None, phase: str | None = None) -> Claimed | None:
    """Take the first queued candidate of a running job (of this step, or of any step of this phase), or one
    whose worker's lease ran out; None when there is none. A candidate whose workers died max_attempts times is
    failed instead (it would kill the next one too)."""
    while True:
        now = utcnow()
        with sessions.begin() as session:
            job = session.execute(select(Job.status, Job.cancel_requested).where(Job.id == job_id)).one_or_none()
            if job is None or job.status != JobStatus.RUNNING or job.cancel_requested:
                return None
            row = session.execute(select(JobCandidate.step, JobCandidate.model_id, JobCandidate.attempts)
                                  .where(_claimable(job_id, now, step, phase))
                                  .order_by(JobCandidate.position).limit(1)).first()
            if row is None:
                return None
            guard = and_(JobCandidate.step == row.step, JobCandidate.model_id == row.model_id,
                         _claimable(job_id, now, step, phase))
            if row.attempts >= max_attempts:
                error = f"RuntimeError: the workers scoring this candidate died {row.attempts} times; giving up"
                session.execute(update(JobCandidate).where(guard).values(
                    status=CandidateStatus.FAILED, token=None, lease_expires_at=None, finished_at=now,
                    record={"details": {"error": error}}))
                continue
            taken = session.execute(update(JobCandidate).where(guard).values(
                status=CandidateStatus.RUNNING, token=token, worker=worker[:200], attempts=JobCandidate.attempts + 1,
                lease_expires_at=now + timedelta(seconds=lease_seconds), started_at=now, progress=0.0))
            if taken.rowcount == 1:
                return Claimed(row.step, row.model_id)
        # another worker took it between the select and the update: look again


def _owned(job_id: str, model_id: str, token: str):  # type: ignore[no-untyped-def]
    # the token is this claim's own: it names the step too
    return and_(JobCandidate.job_id == job_id, JobCandidate.model_id == model_id, JobCandidate.token == token,
                JobCandidate.status == CandidateStatus.RUNNING)


def renew_candidate(sessions: sessionmaker, job_id: str, model_id: str, token: str, lease_seconds: float) -> bool:
    with sessions.begin() as session:
        result = session.execute(update(JobCandidate).where(_owned(job_id, model_id, token))
                                 .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds)))
        return result.rowcount == 1


def report_candidate(sessions: sessionmaker, job_id: str, model_id: str, token: str, progress: float) -> None:
    """Write the candidate's progress; raise LeaseLost if it went to another worker, JobCancelled if its job is
    being cancelled or no longer runs (its coordinator ended it)."""
    with sessions.begin() as session:
        result = session.execute(update(JobCandidate).where(_owned(job_id, model_id, token))
                                 .values(progress=max(0.0, min(1.0, progress))))
        if result.rowcount != 1:
            raise LeaseLost(job_id)
        job = session.execute(select(Job.status, Job.cancel_requested).where(Job.id == job_id)).one()
    if job.cancel_requested or job.status != JobStatus.RUNNING:
        raise JobCancelled(job_id)


def finish_candidate(sessions: sessionmaker, job_id: str, model_id: str, token: str, status: CandidateStatus,
                     record: dict[str, Any]) -> None:
    """Record a scored (or failed) candidate; LeaseLost if this worker no longer owns it."""
    if not status.done:
        raise ValueError(f"a candidate cannot finish as {status}")
    with sessions.begin() as session:
        result = session.execute(update(JobCandidate).where(_owned(job_id, model_id, token)).values(
            status=status, record=finite_json(record), token=None, lease_expires_at=None, progress=1.0,
            finished_at=utcnow()))
        if result.rowcount != 1:
            raise LeaseLost(job_id)


def release_candidate(sessions: sessionmaker, job_id: str, model_id: str, token: str) -> None:
    """Hand an unfinished candidate back (this worker stops without scoring it): queued again, this attempt not
    counted against it."""
    with sessions.begin() as session:
        session.execute(update(JobCandidate).where(_owned(job_id, model_id, token)).values(
            status=CandidateStatus.QUEUED, token=None, lease_expires_at=None, attempts=JobCandidate.attempts - 1))

"""The job state machine over the jobs table, shared by the API, the workers and the reconciler.

Every transition is a compare-and-set UPDATE, so duplicate broker messages, two workers, or a worker whose lease
expired can never both write a job: the one holding `worker_token` with a live lease is the only writer.
No torch here: the API process imports this module.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.contract import JobPhase, JobStatus
from service.contract.status import allowed
from service.db import Job, utcnow

log = logging.getLogger("hubtune.jobs")

TASK_FOR_PHASE = {JobPhase.RANK: "hubtune.rank", JobPhase.TUNE: "hubtune.tune"}
QUEUE_FOR_PHASE = {JobPhase.RANK: "rank", JobPhase.TUNE: "tune"}

SendTask = Callable[[str, str, str], Any]  # (task name, job id, queue)


class LeaseLost(Exception):
    """This worker no longer owns the job (its lease expired and the job went to another worker)."""


class JobCancelled(Exception):
    """The user asked to cancel the job; raised at the next progress checkpoint."""


def celery_sender(celery_app: Any) -> SendTask:
    def send(task_name: str, job_id: str, queue: str) -> Any:
        return celery_app.send_task(task_name, args=[job_id], queue=queue)

    return send


def enqueue(sessions: sessionmaker, send: SendTask, job_id: str, phase: str) -> None:
    """Send the job id to the broker. Called only after the row is committed."""
    send(TASK_FOR_PHASE[phase], job_id, QUEUE_FOR_PHASE[phase])
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()))


def claim(sessions: sessionmaker, job_id: str, phase: str, token: str, lease_seconds: float) -> bool:
    """Take the job if it is queued for this phase (or its previous owner's lease expired)."""
    now = utcnow()
    with sessions.begin() as session:
        result = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.phase == phase,
                Job.cancel_requested.is_(False),
                or_(Job.status == JobStatus.QUEUED, and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)),
            )
            .values(status=JobStatus.RUNNING, worker_token=token,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                    heartbeat_at=now, attempts=Job.attempts + 1, started_at=now, error=None)
        )
        return result.rowcount == 1


def _owned(token: str, job_id: str):  # type: ignore[no-untyped-def]
    return and_(Job.id == job_id, Job.worker_token == token, Job.status == JobStatus.RUNNING)


def renew_lease(sessions: sessionmaker, job_id: str, token: str, lease_seconds: float) -> bool:
    now = utcnow()
    with sessions.begin() as session:
        result = session.execute(
            update(Job).where(_owned(token, job_id))
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds), heartbeat_at=now)
        )
        return result.rowcount == 1


def report_progress(sessions: sessionmaker, job_id: str, token: str, stage: str, progress: float) -> None:
    """Write stage/progress; raise LeaseLost if another worker took over, JobCancelled if the user cancelled."""
    with sessions.begin() as session:
        result = session.execute(
            update(Job).where(_owned(token, job_id)).values(stage=stage, progress=max(0.0, min(1.0, progress)))
        )
        if result.rowcount != 1:
            raise LeaseLost(job_id)
        cancel = session.execute(select(Job.cancel_requested).where(Job.id == job_id)).scalar_one()
    if cancel:
        raise JobCancelled(job_id)


def finish(session: Session, job_id: str, token: str, **values: Any) -> None:
    """Final transition inside the caller's transaction (so results and status commit together)."""
    if "status" in values and not allowed(JobStatus.RUNNING, values["status"]):
        raise ValueError(f"a running job cannot become {values['status']}")
    result = session.execute(update(Job).where(_owned(token, job_id)).values(worker_token=None, lease_expires_at=None,
                                                                            **values))
    if result.rowcount != 1:
        raise LeaseLost(job_id)


def request_cancel(sessions: sessionmaker, job_id: str) -> str:
    """Queued jobs are cancelled at once; running ones stop at their next progress checkpoint."""
    now = utcnow()
    with sessions.begin() as session:
        session.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED)
            .values(status=JobStatus.CANCELLED, stage="cancelled", cancel_requested=True, finished_at=now)
        )
        session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING)
                        .values(cancel_requested=True))
        return session.execute(select(Job.status).where(Job.id == job_id)).scalar_one()


def reconcile_once(sessions: sessionmaker, send: SendTask, max_attempts: int,
                   requeue_queued_after_seconds: float) -> list[str]:
    """Re-queue jobs whose worker died (lease expired) and re-send queued jobs whose message may be lost."""
    now = utcnow()
    requeued: list[str] = []
    with sessions() as session:
        expired = session.execute(
            select(Job.id, Job.phase, Job.attempts, Job.cancel_requested)
            .where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
        ).all()
        stale = session.execute(
            select(Job.id, Job.phase).where(
                Job.status == JobStatus.QUEUED,
                or_(Job.enqueued_at.is_(None), Job.enqueued_at < now - timedelta(seconds=requeue_queued_after_seconds)),
                Job.created_at < now - timedelta(seconds=requeue_queued_after_seconds),
            )
        ).all()
    for job_id, phase, attempts, cancel_requested in expired:
        if cancel_requested:
            values = dict(status=JobStatus.CANCELLED, stage="cancelled", finished_at=now)
        elif attempts >= max_attempts:
            values = dict(status=JobStatus.FAILED, stage="failed", finished_at=now,
                          error=f"the worker running this job died {attempts} times; giving up")
        else:
            values = dict(status=JobStatus.QUEUED, stage="requeued after a worker was lost")
        with sessions.begin() as session:
            result = session.execute(
                update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
                .values(worker_token=None, lease_expires_at=None, **values)
            )
            changed = result.rowcount == 1
        if changed and values["status"] == JobStatus.QUEUED:
            log.warning("job %s lost its worker (lease expired); re-queued", job_id)
            enqueue(sessions, send, job_id, phase)
            requeued.append(job_id)
    for job_id, phase in stale:
        log.warning("job %s queued without a live message; re-sending", job_id)
        enqueue(sessions, send, job_id, phase)
        requeued.append(job_id)
    return requeued


@dataclass
class Reconciler:
    """A daemon thread running reconcile_once every `interval` seconds (API process and workers)."""

    sessions: sessionmaker
    send: SendTask
    interval: float
    max_attempts: int
    requeue_queued_after_seconds: float

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hubtune-reconciler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                reconcile_once(self.sessions, self.send, self.max_attempts, self.requeue_queued_after_seconds)
            except Exception:  # keep reconciling through transient DB/broker errors
                log.exception("reconciler pass failed")

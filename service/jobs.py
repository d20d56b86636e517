"""The job state machine over the jobs table, shared by the API, the workers and the reconciler.

Every transition is a compare-and-set UPDATE, so duplicate broker messages, two workers, or a worker whose lease
expired can never both write a job: the one holding `worker_token` with a live lease is the only writer.
No torch here: the API process imports this module.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, case, or_, select, update
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as SQLTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from service.contract import JobPhase, JobStatus
from service.contract.status import allowed
from service.db import Job, utcnow

log = logging.getLogger("hubtune.jobs")

TASK_FOR_PHASE = {JobPhase.RANK: "hubtune.rank", JobPhase.TUNE: "hubtune.tune"}
QUEUE_FOR_PHASE = {JobPhase.RANK: "rank", JobPhase.TUNE: "tune"}

SendTask = Callable[[str, str, str], Any]  # (task name, job id, queue)
STAGE_LENGTH = Job.__table__.c.stage.type.length


class LeaseLost(Exception):
    """This worker no longer owns the job (its lease expired and the job went to another worker)."""


class JobCancelled(Exception):
    """The user asked to cancel the job; raised at the next progress checkpoint."""


def celery_sender(celery_app: Any) -> SendTask:
    def send(task_name: str, job_id: str, queue: str) -> Any:
        return celery_app.send_task(task_name, args=[job_id], queue=queue)

    return send


# The stage of a queued job whose message could not be sent (the broker was down or did not answer in time): the
# reconciler sends it again at its next pass, instead of after requeue_queued_after_seconds.
UNSENT_STAGE = "waiting for the broker"


def enqueue(sessions: sessionmaker, send: SendTask, job_id: str, phase: str) -> bool:
    """Send the job id to the broker. Called only after the row is committed. False when the broker could not take
    it: the job is then marked unsent, and the reconciler sends it as soon as the broker answers again."""
    try:
        send(TASK_FOR_PHASE[phase], job_id, QUEUE_FOR_PHASE[phase])
    except Exception as exc:  # any broker failure: refused, timed out, a lost connection
        log.warning("job %s: the broker did not take its message (%s); it will be sent again", job_id,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__, extra={"job_id": job_id})
        _record(sessions, job_id, enqueued_at=None, stage=UNSENT_STAGE)
        return False
    _record(sessions, job_id, enqueued_at=utcnow(), stage=case((Job.stage == UNSENT_STAGE, "queued"), else_=Job.stage))
    return True


def _record(sessions: sessionmaker, job_id: str, **values: Any) -> None:
    """Write what became of a queued job's message. A database that is down too is only logged: a queued job
    whose enqueued_at is old or missing is re-sent after requeue_queued_after_seconds anyway."""
    try:
        with sessions.begin() as session:
            session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED).values(**values))
    except SQLAlchemyError:
        log.exception("job %s: could not record its message's state", job_id, extra={"job_id": job_id})


def broker_probe(broker_url: str, queue_folder: Path, timeout_seconds: float) -> Callable[[], object]:
    """A check that raises unless the broker answers within the timeout (for /healthz)."""
    if broker_url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        client = redis.Redis.from_url(broker_url, socket_timeout=timeout_seconds,
                                      socket_connect_timeout=timeout_seconds)
        return client.ping
    if broker_url.startswith("filesystem"):
        def folder_writable() -> None:
            if not (queue_folder.is_dir() and os.access(queue_folder, os.W_OK)):
                raise OSError(f"the broker folder {queue_folder} is not a writable folder")

        return folder_writable

    def connects() -> None:
        from kombu import Connection

        with Connection(broker_url, connect_timeout=timeout_seconds) as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout_seconds)

    return connects


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
        result = session.execute(  # the column holds 64 characters: a long model name is cut, not an error
            update(Job).where(_owned(token, job_id)).values(stage=stage[:STAGE_LENGTH],
                                                            progress=max(0.0, min(1.0, progress)))
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
        cutoff = now - timedelta(seconds=requeue_queued_after_seconds)
        stale = session.execute(
            select(Job.id, Job.phase).where(
                Job.status == JobStatus.QUEUED,
                or_(Job.stage == UNSENT_STAGE,  # its send failed: at once
                    # sent long ago or never recorded (the API died between commit and send): the message may be lost
                    and_(or_(Job.enqueued_at.is_(None), Job.enqueued_at < cutoff), Job.created_at < cutoff)),
            ).order_by(Job.created_at)
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
            log.warning("job %s lost its worker (lease expired); re-queued", job_id, extra={"job_id": job_id})
            enqueue(sessions, send, job_id, phase)
            requeued.append(job_id)
    for job_id, phase in stale:
        log.warning("job %s queued without a live message; sending it", job_id, extra={"job_id": job_id})
        if not enqueue(sessions, send, job_id, phase):
            break  # the broker is still down: the others wait for the next pass rather than one timeout each
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
            except (OperationalError, SQLTimeoutError) as exc:  # the database is down: one line a pass, not a trace
                log.warning("reconciler pass skipped, database unavailable: %s", str(exc).splitlines()[0])
            except Exception:  # keep reconciling through any other transient error
                log.exception("reconciler pass failed")

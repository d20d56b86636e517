"""A job step fanned out over workers, one candidate at a time (service/candidates.py holds the state machine).

The worker holding the job (the coordinator) opens the step's candidates, sends one message per candidate but one,
does candidates itself until none is left to claim, waits for those running elsewhere, and returns every
candidate's record; any other worker that receives a message claims one candidate and does it. Each candidate runs
under its own lease, renewed by its own heartbeat. With workers/runner.py, the only worker code that touches the
database; what a candidate's work is belongs to the runner (it knows the job's phases).
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLTimeoutError
from sqlalchemy.orm import sessionmaker

from service import candidates as candidate_states
from service import jobs as job_states
from service.contract import CandidateStatus
from service.logs import log_context
from service.settings import Settings

log = logging.getLogger("hubtune.fanout")

Progress = Callable[[str, float], None]
# A candidate's work: (model id, stage, progress, its (start, span) on that progress's scale) -> (what the
# coordinator keeps in memory, or None; the record to store, JSON; whether it failed).
Work = Callable[[str, str, Progress, tuple[float, float]], tuple[Any, dict[str, Any], bool]]
CANDIDATE_TASKS = {"rank": "hubtune.rank_candidate", "tune": "hubtune.tune_candidate"}  # workers/tasks.py
# A database that is down, frozen (a statement timeout) or restarting (a dropped connection).
TRANSIENT = (OperationalError, SQLTimeoutError, InterfaceError)
T = TypeVar("T")


def patiently(call: Callable[[], T], settings: Settings, what: str) -> T:
    """call(), tried again while the database is unavailable, for at most a lease (after that the job or the
    candidate is someone else's anyway). The coordinator's bookkeeping between candidates must not fail a job
    that an outage only paused."""
    deadline, delay = time.monotonic() + settings.lease_seconds, 0.5
    while True:
        try:
            return call()
        except TRANSIENT as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("%s: database unavailable (%s); trying again", what, str(exc).splitlines()[0][:200])
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


def worker_name() -> str:
    """Who did a candidate: this host and process, and its GPU when `hubtune worker --gpus` gave it one."""
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{socket.gethostname()}:{os.getpid()}" + (f":gpu{gpu}" if gpu else "")


class Heartbeat:
    """Renews a lease (a job's, or a candidate's) from a daemon thread while the work runs: `renew()` returns
    False once the lease went to another worker."""

    def __init__(self, renew: Callable[[], bool], name: str, settings: Settings) -> None:
        self.renew, self.name, self.settings = renew, name, settings
        self.lost = threading.Event()
        self._stop = threading.Event()
        # run in a copy of this thread's context, so its log lines carry the job's log_context too
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,),
                                        name=f"heartbeat-{name}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                if not self.renew():
                    self.lost.set()
                    return
            except Exception:  # a transient DB error: try again next beat; the lease covers several beats
                log.exception("heartbeat for %s failed", self.name)


class CandidateProgress:
    """A candidate's progress on its row (throttled), for a worker other than the job's coordinator: surfaces its
    job's cancellation and a lost candidate lease."""

    def __init__(self, sessions: sessionmaker, job_id: str, model_id: str, token: str,
                 min_interval: float = 1.0) -> None:
        self.sessions, self.job_id, self.model_id, self.token = sessions, job_id, model_id, token
        self.min_interval, self._last = min_interval, 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        now = time.monotonic()
        if now - self._last < self.min_interval:
            return
        self._last = now
        try:
            candidate_states.report_candidate(self.sessions, self.job_id, self.model_id, self.token, fraction)
        except (OperationalError, SQLTimeoutError):
            log.warning("job %s: candidate progress not recorded, database unavailable", self.job_id)


@dataclass(frozen=True)
class Step:
    """One fanned-out step of one job, as a worker sees it."""

    sessions: sessionmaker
    job_id: str
    name: str  # service.candidates step name
    settings: Settings

    def do(self, model_id: str, token: str, work: Work, report: Progress, stage: str,
           where: tuple[float, float]) -> Any:
        """Do a candidate this worker claimed, under its own lease; record it, or hand it back when stopped.
        Returns what the work keeps in memory (None if it failed)."""
        settings = self.settings
        heartbeat = Heartbeat(lambda: candidate_states.renew_candidate(self.sessions, self.job_id, model_id, token,
                                                                       settings.lease_seconds),
                              f"{self.job_id}-{model_id}", settings)

        def checked(stage: str, fraction: float) -> None:
            if heartbeat.lost.is_set():
                raise job_states.LeaseLost(self.job_id)
            report(stage, fraction)

        with heartbeat, log_context(model_id=model_id):
            try:
                kept, record, failed = work(model_id, stage[:64], checked, where)
            except BaseException:
                self.release(model_id, token)
                raise
            record.setdefault("details", {})["worker"] = worker_name()
            status = CandidateStatus.FAILED if failed else CandidateStatus.SCORED
            patiently(lambda: candidate_states.finish_candidate(self.sessions, self.job_id, model_id, token, status,
                                                                record), settings, f"job {self.job_id}: recording")
        return kept

    def _states(self) -> list[candidate_states.CandidateState]:
        return patiently(lambda: candidate_states.candidate_states(self.sessions, self.job_id, self.name),
                         self.settings, f"job {self.job_id} ({self.name})")

    def release(self, model_id: str, token: str) -> None:
        """Hand a claimed candidate back, unfinished (service.candidates.release_candidate)."""
        try:
            candidate_states.release_candidate(self.sessions, self.job_id, model_id, token)
        except Exception:  # the database is down: the candidate's lease runs out instead
            log.warning("job %s: candidate %s not handed back; its lease will expire", self.job_id, model_id)

    def coordinate(self, model_ids: list[str], names: dict[str, str], label: str, work: Work,
                   progress: Progress, span: tuple[float, float] = (0.0, 0.85)
                   ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """Run the step over `model_ids` with every free worker: ({model id: its record, with its `attempts`},
        {model id: what `work` kept, for the candidates done here}). `progress` raises on cancel or a lost job
        lease; span: the step's (start, width) on progress's scale."""
        settings, what = self.settings, f"job {self.job_id} ({self.name})"
        patiently(lambda: candidate_states.open_candidates(self.sessions, self.job_id, self.name, model_ids),
                  settings, what)
        pending = sum(not c.done for c in self._states())
        send_candidate_messages(self.job_id, candidate_states.step_phase(self.name), pending - 1, settings)
        start, width = span
        kept: dict[str, Any] = {}
        while True:
            states = self._states()
            done, count = sum(c.done for c in states), len(states)
            if done == count:
                break
            progress(f"{label}: {done}/{count} done", start + width * done / count)
            token = uuid.uuid4().hex
            claimed = patiently(lambda token=token: candidate_states.claim_candidate(
                self.sessions, self.job_id, token, worker_name(), settings.lease_seconds, settings.max_attempts,
                step=self.name), settings, what)
            if claimed is None:  # the rest are being done elsewhere
                time.sleep(settings.candidate_poll_seconds)
                continue
            model_id = claimed.model_id
            kept[model_id] = self.do(model_id, token, work, progress,
                                     f"{label} {done + 1}/{count}: {names.get(model_id, model_id)}",
                                     (start + width * done / count, width / count))
        records = {c.model_id: dict(c.record or {}, details=dict((c.record or {}).get("details", {}),
                                                                 attempts=c.attempts)) for c in states}
        return records, {model_id: value for model_id, value in kept.items() if value is not None}


def send_candidate_messages(job_id: str, phase: str, count: int, settings: Settings) -> None:
    """One message per candidate for other workers to take. A broker that does not take them costs no candidate:
    the coordinator does whatever nobody else claims."""
    if count <= 0:
        return
    from workers.celery_app import make_celery

    app = make_celery(settings)
    try:
        for _ in range(count):
            app.send_task(CANDIDATE_TASKS[phase], args=[job_id], queue=job_states.QUEUE_FOR_PHASE[phase])
    except Exception as exc:
        log.warning("job %s: candidate messages not sent (%s); doing them here", job_id, exc)

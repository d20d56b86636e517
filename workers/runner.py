"""Run one phase of one job: claim the row, keep its lease alive, read its inputs, call the phase, record the result.

This is the only worker code that touches the database: it reads the job, its dataset, candidates and ranking into
plain data (workers/phases/inputs.py), the phase functions (workers/phases/rank.py, tune.py) compute and return
their results, and those are written here in the same transaction as the final status, guarded by the worker's
token, so a job re-run after a crash ends with one ranking (one set of checkpoints), never two.
"""

from __future__ import annotations

import contextvars
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as SQLTimeoutError
from sqlalchemy.orm import sessionmaker

from service import candidates as candidate_states
from service import jobs as job_states
from service.artifacts import artifact_store, publish_checkpoint
from service.contract import CandidateStatus, JobPhase, JobStatus
from service.db import (
    Checkpoint,
    DatabaseTimeouts,
    Dataset,
    HubModel,
    Job,
    RankingEntry,
    ranking_rows,
    session_factory,
    utcnow,
)
from service.logs import log_context
from service.settings import Settings, get_settings
from workers.phases import rank as rank_phase
from workers.phases.inputs import FeatureSettings, RankedCandidate, RankInput, TuneDataset, TuneInput
from workers.pipeline import DatasetSpec, ModelSpec

CANDIDATE_TASK = "hubtune.rank_candidate"  # workers/tasks.py

log = logging.getLogger("hubtune.runner")


class Heartbeat:
    """Renews a lease (a job's, or a candidate's) from a daemon thread while the pipeline runs: `renew()` returns
    False once the lease went to another worker."""

    def __init__(self, renew: Callable[[], bool], name: str, settings: Settings) -> None:
        self.renew, self.name, self.settings = renew, name, settings
        self.lost = threading.Event()
        self._stop = threading.Event()
        # run in a copy of this thread's context, so its log lines carry the job's log_context too
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,),
                                        name=f"heartbeat-{name}", daemon=True)

    @classmethod
    def for_job(cls, sessions: sessionmaker, job_id: str, token: str, settings: Settings) -> Heartbeat:
        return cls(lambda: job_states.renew_lease(sessions, job_id, token, settings.lease_seconds), job_id, settings)

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


class ProgressReporter:
    """Writes stage/progress to the row (throttled), and surfaces cancel requests and lost leases."""

    def __init__(self, sessions: sessionmaker, job_id: str, token: str, heartbeat: Heartbeat,
                 min_interval: float = 0.5) -> None:
        self.sessions, self.job_id, self.token, self.heartbeat = sessions, job_id, token, heartbeat
        self.min_interval = min_interval
        self._last_stage: str | None = None
        self._last_time = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        if self.heartbeat.lost.is_set():
            raise job_states.LeaseLost(self.job_id)
        now = time.monotonic()
        if stage == self._last_stage and now - self._last_time < self.min_interval and fraction < 1.0:
            return
        self._last_stage, self._last_time = stage, now
        try:
            job_states.report_progress(self.sessions, self.job_id, self.token, stage, fraction)
        except (OperationalError, SQLTimeoutError):
            # The database is down or frozen for now: progress is shown, not needed. The work goes on; the heartbeat
            # keeps trying, and the lease covers several beats (the job is re-queued only if it runs out).
            log.warning("job %s: progress not recorded, database unavailable", self.job_id)


def model_spec(model: HubModel) -> ModelSpec:
    """What the pipeline needs of a catalog entry."""
    return ModelSpec(model.id, model.name, model.source, model.locator, model.revision)


def dataset_spec(dataset: Dataset, settings: Settings) -> DatasetSpec:
    """The dataset as a real file: where it is stored, or the worker's cached copy of an object in S3."""
    path = artifact_store(settings).local_copy(dataset.storage_path)
    return DatasetSpec(path=path, task=dataset.task, label_names=dataset.label_names)


def _load(sessions: sessionmaker, job_id: str) -> tuple[Job, Dataset, list[HubModel]]:
    """The job, its dataset and its candidate models that are still in the catalog, in the job's order."""
    with sessions() as session:
        job = session.get(Job, job_id)
        dataset = session.get(Dataset, job.dataset_id)
        models = {m.id: m for m in session.execute(select(HubModel).where(
            HubModel.id.in_(job.candidates), HubModel.removed_at.is_(None))).scalars()}  # removed: not run
        candidates = [models[i] for i in job.candidates if i in models]
    if not candidates:
        raise ValueError("none of the job's candidate models exist any more")
    return job, dataset, candidates


def worker_name() -> str:
    """Who scored a candidate: this host and process, and its GPU when `hubtune worker --gpus` gave it one."""
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{socket.gethostname()}:{os.getpid()}" + (f":gpu{gpu}" if gpu else "")


def _rank_input(job: Job, dataset: Dataset, models: list[HubModel], settings: Settings) -> RankInput:
    return RankInput(dataset=dataset_spec(dataset, settings), models=[model_spec(m) for m in models],
                     metrics=job.metrics, options=job.options, features=FeatureSettings.from_settings(settings),
                     bootstrap_samples=settings.bootstrap_samples)


def _send_candidate_messages(job_id: str, count: int, settings: Settings) -> None:
    """One message per candidate for other workers to take. A broker that does not take them costs no candidate:
    the coordinator scores whatever nobody else claims."""
    if count <= 0:
        return
    from workers.celery_app import make_celery

    app = make_celery(settings)
    try:
        for _ in range(count):
            app.send_task(CANDIDATE_TASK, args=[job_id], queue=job_states.QUEUE_FOR_PHASE[JobPhase.RANK])
    except Exception as exc:
        log.warning("job %s: candidate messages not sent (%s); scoring them here", job_id, exc)


def _rank_fanned_out(sessions: sessionmaker, job_id: str, inputs: RankInput, progress: ProgressReporter,
                     settings: Settings) -> rank_phase.RankOutcome:
    """The coordinator of a rank job: open a row per candidate, ask other workers to claim them, score the ones
    nobody has claimed, wait for the rest, then assemble the ranking (once: this worker holds the job's lease)."""
    candidate_states.open_candidates(sessions, job_id, [m.id for m in inputs.models])
    pending = sum(not c.done for c in candidate_states.candidate_states(sessions, job_id))
    _send_candidate_messages(job_id, pending - 1, settings)
    rows = rank_phase.job_rows(inputs)
    models = {m.id: m for m in inputs.models}
    scored_here: dict[str, Any] = {}  # features of the candidates this worker scored, kept for the assembly
    while True:
        states = candidate_states.candidate_states(sessions, job_id)
        done, count = sum(c.done for c in states), len(states)
        if done == count:
            break
        progress(f"scored {done}/{count} candidates", 0.85 * done / count)  # raises on cancel, a lost lease
        token = uuid.uuid4().hex
        claimed = candidate_states.claim_candidate(sessions, job_id, token, worker_name(), settings.lease_seconds,
                                                   settings.max_attempts)
        if claimed is None:  # the rest are being scored elsewhere
            time.sleep(settings.candidate_poll_seconds)
            continue
        model = models[claimed]
        scored_here[claimed] = _score_claimed(sessions, job_id, inputs, rows, model, token, progress, settings,
                                              stage=f"features {done + 1}/{count}: {model.name}",
                                              where=(0.85 * done / count, 0.85 / count))
    # how often each was claimed: more than once when a worker scoring it died
    records = {c.model_id: dict(c.record or {}, details=dict((c.record or {}).get("details", {}), attempts=c.attempts))
               for c in states}
    return rank_phase.assemble(inputs, rows, records, progress, known_features=scored_here)


def _score_claimed(sessions: sessionmaker, job_id: str, inputs: RankInput, rows: Any, model: ModelSpec, token: str,
                   report: Callable[[str, float], None], settings: Settings, *, stage: str,
                   where: tuple[float, float]) -> Any:
    """Score a candidate this worker claimed, under its own lease; record it, or hand it back when stopped.
    stage, where: what `report` is told while it runs, and its (start, span) on report's progress scale.
    Returns its features and source probabilities (None if it failed)."""
    heartbeat = Heartbeat(lambda: candidate_states.renew_candidate(sessions, job_id, model.id, token,
                                                                   settings.lease_seconds),
                          f"{job_id}-{model.id}", settings)

    def checked(stage: str, fraction: float) -> None:
        if heartbeat.lost.is_set():
            raise job_states.LeaseLost(job_id)
        report(stage, fraction)

    with heartbeat, log_context(model_id=model.id):
        try:
            features, record = rank_phase.score_one(inputs, rows, model, stage[:64], where, checked)
        except BaseException:
            _release(sessions, job_id, model.id, token)
            raise
        record["details"]["worker"] = worker_name()
        failed = "error" in record["details"]
        candidate_states.finish_candidate(sessions, job_id, model.id, token,
                                          CandidateStatus.FAILED if failed else CandidateStatus.SCORED, record)
    return features


def _release(sessions: sessionmaker, job_id: str, model_id: str, token: str) -> None:
    try:
        candidate_states.release_candidate(sessions, job_id, model_id, token)
    except Exception:  # the database is down: the candidate's lease runs out instead
        log.warning("job %s: candidate %s not handed back; its lease will expire", job_id, model_id)


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


def run_candidate(job_id: str, settings: Settings | None = None) -> str:
    """Claim one candidate of a running rank job and score it (any worker; the job's coordinator assembles the
    ranking). Returns what happened, for logs and tests."""
    with log_context(job_id=job_id, phase="rank"):
        settings = settings or get_settings()
        sessions = session_factory(settings.sqlalchemy_url, DatabaseTimeouts.from_settings(settings))
        token = uuid.uuid4().hex
        model_id = candidate_states.claim_candidate(sessions, job_id, token, worker_name(), settings.lease_seconds,
                                                    settings.max_attempts)
        if model_id is None:
            return "skipped"
        try:
            job, dataset, models = _load(sessions, job_id)
            inputs = _rank_input(job, dataset, models, settings)
            model = next(m for m in inputs.models if m.id == model_id)
            rows = rank_phase.job_rows(inputs)
        except Exception:
            log.exception("job %s: candidate %s could not be prepared", job_id, model_id)
            _release(sessions, job_id, model_id, token)
            return "released"
        try:
            features = _score_claimed(sessions, job_id, inputs, rows, model, token,
                                      CandidateProgress(sessions, job_id, model_id, token), settings,
                                      stage=f"features: {model.name}", where=(0.0, 1.0))
            return "scored" if features is not None else "failed"
        except (job_states.LeaseLost, job_states.JobCancelled):
            log.info("job %s: candidate %s stopped (job cancelled, ended, or the lease lost)", job_id, model_id)
            return "stopped"
        except Exception:
            log.exception("job %s: candidate %s failed", job_id, model_id)
            return "released"


def _rank(sessions: sessionmaker, job_id: str, token: str, progress: ProgressReporter, settings: Settings) -> None:
    job, dataset, models = _load(sessions, job_id)
    inputs = _rank_input(job, dataset, models, settings)
    if job.options.get("successive_halving"):  # its rounds depend on each other: one process runs them all
        outcome = rank_phase.run_rank(inputs, progress)
    else:
        outcome = _rank_fanned_out(sessions, job_id, inputs, progress, settings)
    tuning_next = job.tune is not None
    with sessions.begin() as session:
        session.execute(delete(RankingEntry).where(RankingEntry.job_id == job.id))
        session.add_all(RankingEntry(job_id=job.id, model_id=r.model_id, rank=r.rank, scores=r.scores,
                                     details=r.details, feature_seconds=r.feature_seconds) for r in outcome.ranking)
        if tuning_next:
            job_states.finish(session, job.id, token, status=JobStatus.QUEUED, phase=JobPhase.TUNE,
                              stage="ranked; waiting to tune", progress=0.0, ranking_summary=outcome.summary)
        else:
            job_states.finish(session, job.id, token, status=JobStatus.SUCCEEDED, stage="done", progress=1.0,
                              finished_at=utcnow(), ranking_summary=outcome.summary)
    if tuning_next:
        from workers.celery_app import make_celery

        job_states.enqueue(sessions, job_states.celery_sender(make_celery(settings)), job.id, JobPhase.TUNE)


def _tune_input(sessions: sessionmaker, job_id: str, settings: Settings) -> TuneInput:
    job, dataset, _ = _load(sessions, job_id)
    with sessions() as session:
        rows = ranking_rows(session, job_id)
        ranking = [RankedCandidate(model_spec(model), entry.scores, (entry.details or {}).get("error") or None)
                   for entry, model in rows]
    # the columns say what the checkpoint reads: a text, a pair for tokenizer(text, text_pair), or images
    columns = {"text": dataset.text_column, "text_pair": dataset.text_pair_column, "image": dataset.image_column,
               "label": dataset.label_column}
    data = TuneDataset(spec=dataset_spec(dataset, settings), sha256=dataset.sha256,
                       columns={k: v for k, v in columns.items() if v is not None})
    return TuneInput(job_id=job.id, spec=job.tune or {}, pooling=job.options.get("pooling", "mean"), dataset=data,
                     ranking=ranking, features=FeatureSettings.from_settings(settings),
                     job_dir=settings.jobs_dir / job.id)


def _tune(sessions: sessionmaker, job_id: str, token: str, progress: ProgressReporter, settings: Settings) -> None:
    from workers.phases.tune import run_tune
    from workers.tuning import TuningCancelled

    try:
        outcome = run_tune(_tune_input(sessions, job_id, settings), progress)
    except TuningCancelled as exc:
        raise job_states.JobCancelled(job_id) from exc
    # in object storage, each checkpoint is uploaded whole (its manifest last) before its row is written
    store = artifact_store(settings)
    paths = {c.name: publish_checkpoint(store, job_id, c.name, c.path) for c in outcome.checkpoints}
    with sessions.begin() as session:
        session.execute(delete(Checkpoint).where(Checkpoint.job_id == job_id))
        session.add_all(Checkpoint(job_id=job_id, name=c.name, model_id=c.model_id, path=paths[c.name],
                                   files=c.files) for c in outcome.checkpoints)
        job_states.finish(session, job_id, token, status=JobStatus.SUCCEEDED, stage="done", progress=1.0,
                          tuning=outcome.tuning, finished_at=utcnow())
    if store.remote:  # the worker's working copy (training state, results) is of no more use
        shutil.rmtree(settings.jobs_dir / job_id, ignore_errors=True)


def run_phase(job_id: str, phase: str, settings: Settings | None = None) -> str:
    """Claim and run one phase ("rank" or "tune") of a job. Returns what happened, for logs and tests. Every line
    logged meanwhile carries the job's id and phase (service.logs)."""
    with log_context(job_id=job_id, phase=str(phase)):
        return _run_phase(job_id, phase, settings)


def _run_phase(job_id: str, phase: str, settings: Settings | None) -> str:
    settings = settings or get_settings()
    sessions = session_factory(settings.sqlalchemy_url, DatabaseTimeouts.from_settings(settings))
    token = uuid.uuid4().hex
    if not job_states.claim(sessions, job_id, phase, token, settings.lease_seconds):
        log.info("job %s (%s) not claimable: already taken, finished or cancelled", job_id, phase)
        return "skipped"
    began = time.monotonic()
    log.info("job %s: %s phase claimed", job_id, phase)
    with Heartbeat.for_job(sessions, job_id, token, settings) as heartbeat:
        progress = ProgressReporter(sessions, job_id, token, heartbeat)
        try:
            run = _rank if phase == JobPhase.RANK else _tune
            run(sessions, job_id, token, progress, settings)
            log.info("job %s: %s phase done in %.1f s", job_id, phase, time.monotonic() - began)
            return "done"
        except job_states.LeaseLost:
            log.warning("job %s: lease lost to another worker; dropping this attempt", job_id)
            return "lease-lost"
        except job_states.JobCancelled:
            _end(sessions, job_id, token, status=JobStatus.CANCELLED, stage="cancelled")
            return "cancelled"
        except Exception as exc:
            log.exception("job %s failed", job_id)
            _end(sessions, job_id, token, status=JobStatus.FAILED, stage="failed", error=f"{type(exc).__name__}: {exc}")
            return "failed"


def _end(sessions: sessionmaker, job_id: str, token: str, **values: Any) -> None:
    try:
        with sessions.begin() as session:
            job_states.finish(session, job_id, token, finished_at=utcnow(), **values)
    except job_states.LeaseLost:
        log.warning("job %s: could not record %s, lease lost", job_id, values.get("status"))

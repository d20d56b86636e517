"""Run one phase of one job: claim the row, keep its lease alive, call the pipeline, record the result.

This is the only worker code that touches the database. Results are written in the same transaction as the final
status, guarded by the worker's token, so a job re-run after a crash ends with one ranking, never two.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import sessionmaker

from service import jobs as job_states
from service.contract import JobPhase, JobStatus
from service.db import Dataset, HubModel, Job, RankingEntry, session_factory, utcnow
from service.settings import Settings, get_settings

log = logging.getLogger("hubtune.runner")


class Heartbeat:
    """Renews the job's lease from a daemon thread while the pipeline runs."""

    def __init__(self, sessions: sessionmaker, job_id: str, token: str, settings: Settings) -> None:
        self.sessions, self.job_id, self.token, self.settings = sessions, job_id, token, settings
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                if not job_states.renew_lease(self.sessions, self.job_id, self.token, self.settings.lease_seconds):
                    self.lost.set()
                    return
            except Exception:  # a transient DB error: try again next beat; the lease covers several beats
                log.exception("heartbeat for job %s failed", self.job_id)


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
        job_states.report_progress(self.sessions, self.job_id, self.token, stage, fraction)


def feature_batch_size(settings: Settings) -> int:
    from workers.features import pick_device

    on_gpu = pick_device(settings.device).startswith("cuda")
    return settings.feature_batch_size_gpu if on_gpu else settings.feature_batch_size


def _load(sessions: sessionmaker, job_id: str) -> tuple[Job, Dataset, list[HubModel]]:
    with sessions() as session:
        job = session.get(Job, job_id)
        dataset = session.get(Dataset, job.dataset_id)
        models = {m.id: m for m in session.execute(select(HubModel).where(HubModel.id.in_(job.candidates))).scalars()}
        return job, dataset, [models[i] for i in job.candidates if i in models]


def _rank_phase(sessions: sessionmaker, job: Job, dataset: Dataset, models: list[HubModel], token: str,
                progress: ProgressReporter, settings: Settings) -> None:
    from workers import pipeline

    dataset_spec = pipeline.DatasetSpec(path=Path(dataset.storage_path), task=dataset.task,
                                        label_names=dataset.label_names)
    model_specs = [pipeline.ModelSpec(m.id, m.name, m.source, m.locator, m.revision) for m in models]
    common = dict(cache_root=settings.features_dir, hf_cache_dir=settings.hf_cache_dir,
                  seed=job.options.get("seed", 0), max_length=settings.feature_max_length,
                  pooling=job.options.get("pooling", "mean"),
                  batch_size=feature_batch_size(settings), device=settings.device,
                  bootstrap_samples=settings.bootstrap_samples, progress=progress)
    summary = None
    halving = job.options.get("successive_halving")
    if halving:
        from workers.halving import rank_successive_halving

        result = rank_successive_halving(dataset_spec, model_specs, job.metrics[0], **halving, **common)
        ranked = result.ranking
        summary = {key: value for key, value in result.to_dict().items() if key != "ranking"}
        summary["mode"] = "successive_halving"
    else:
        ranked = pipeline.rank(dataset_spec, model_specs, job.metrics, sample_size=job.options.get("sample_size"),
                               **common)
    tuning_next = job.tune is not None
    with sessions.begin() as session:
        session.execute(delete(RankingEntry).where(RankingEntry.job_id == job.id))
        session.add_all(RankingEntry(job_id=job.id, model_id=r.model_id, rank=r.rank, scores=r.scores,
                                     details=r.details, feature_seconds=r.feature_seconds) for r in ranked)
        if tuning_next:
            job_states.finish(session, job.id, token, status=JobStatus.QUEUED, phase=JobPhase.TUNE, stage="ranked; waiting to tune",
                              progress=0.0, ranking_summary=summary)
        else:
            job_states.finish(session, job.id, token, status=JobStatus.SUCCEEDED, stage="done", progress=1.0,
                              finished_at=utcnow(), ranking_summary=summary)
    if tuning_next:
        from workers.celery_app import make_celery

        job_states.enqueue(sessions, job_states.celery_sender(make_celery(settings)), job.id, JobPhase.TUNE)


def _tune_phase(sessions: sessionmaker, job: Job, dataset: Dataset, models: list[HubModel], token: str,
                progress: ProgressReporter, settings: Settings) -> None:
    from workers.tune_runner import run_tuning

    run_tuning(sessions, job, dataset, token, progress, settings)


def run_phase(job_id: str, phase: str, settings: Settings | None = None) -> str:
    """Claim and run one phase ("rank" or "tune") of a job. Returns what happened, for logs and tests."""
    settings = settings or get_settings()
    sessions = session_factory(settings.sqlalchemy_url)
    token = uuid.uuid4().hex
    if not job_states.claim(sessions, job_id, phase, token, settings.lease_seconds):
        log.info("job %s (%s) not claimable: already taken, finished or cancelled", job_id, phase)
        return "skipped"
    with Heartbeat(sessions, job_id, token, settings) as heartbeat:
        progress = ProgressReporter(sessions, job_id, token, heartbeat)
        try:
            job, dataset, models = _load(sessions, job_id)
            if not models:
                raise ValueError("none of the job's candidate models exist any more")
            run = _rank_phase if phase == JobPhase.RANK else _tune_phase
            run(sessions, job, dataset, models, token, progress, settings)
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

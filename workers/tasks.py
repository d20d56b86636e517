"""Celery tasks: thin wrappers that run one phase of a job (workers/runner.py does the work)."""

from __future__ import annotations

from service.contract import JobPhase
from workers.celery_app import app


@app.task(name="hubtune.rank", acks_late=True)
def rank_job(job_id: str) -> str:
    from workers.runner import run_phase

    return run_phase(job_id, JobPhase.RANK)


@app.task(name="hubtune.tune", acks_late=True)
def tune_job(job_id: str) -> str:
    from workers.runner import run_phase

    return run_phase(job_id, JobPhase.TUNE)

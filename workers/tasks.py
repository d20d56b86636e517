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


@app.task(name="hubtune.rank_candidate", acks_late=True)
def rank_candidate(job_id: str) -> str:
    """One candidate of a running rank job, whichever is next (the message names the job, not the candidate)."""
    from workers.runner import run_candidate

    return run_candidate(job_id, JobPhase.RANK)


@app.task(name="hubtune.tune_candidate", acks_late=True)
def tune_candidate(job_id: str) -> str:
    """One target of a running tune job, whichever is next."""
    from workers.runner import run_candidate

    return run_candidate(job_id, JobPhase.TUNE)

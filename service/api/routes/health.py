"""GET /healthz: each dependency (database, broker, workers) with its status and how long its check took; 503
when one the API needs is down. Unauthenticated, so it names no host and no error text of a dependency."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from service.api.deps import SessionsDep, SettingsDep
from service.api.problems import RETRY_AFTER_SECONDS, problem_response, problem_responses
from service.contract import JobStatus
from service.db import Job, as_utc, utcnow
from service.schemas import DependencyHealth, Health

router = APIRouter(tags=["health"])

# The checks of one request run side by side, so /healthz takes as long as the slowest, not their sum.
_checks = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hubtune-health")


def _timed(check: Callable[[], object]) -> tuple[bool, float]:
    started = time.monotonic()
    try:
        check()
        ok = True
    except Exception:  # down, refused or timed out: which one is in the API's log, not in a public answer
        ok = False
    return ok, round((time.monotonic() - started) * 1000, 1)


def database_health(sessions: sessionmaker) -> DependencyHealth:
    def ping() -> None:
        with sessions() as session:
            session.execute(select(1))

    ok, latency = _timed(ping)
    return DependencyHealth(status="ok" if ok else "down", required=True, latency_ms=latency,
                            detail=None if ok else "no answer within its timeout, or the connection was refused")


def broker_health(probe: Callable[[], object]) -> DependencyHealth:
    ok, latency = _timed(probe)
    return DependencyHealth(status="ok" if ok else "down", required=True, latency_ms=latency,
                            detail=None if ok else "no answer within its timeout, or the connection was refused; "
                            "jobs are accepted and sent when it is back")


def worker_health(sessions: sessionmaker, lease_seconds: float) -> DependencyHealth:
    """What the jobs table knows of the workers: their heartbeats on running jobs. Workers are not required: a job
    submitted while none runs waits in the queue."""
    started = time.monotonic()
    with sessions() as session:
        running, newest = session.execute(select(func.count(), func.max(Job.heartbeat_at))
                                          .where(Job.status == JobStatus.RUNNING)).one()
        queued = session.execute(select(func.count()).where(Job.status == JobStatus.QUEUED)).scalar_one()
    latency = round((time.monotonic() - started) * 1000, 1)
    age = (utcnow() - as_utc(newest)).total_seconds() if newest is not None else None
    if not running:
        status, detail = "unknown", "no job is running, so no worker heartbeat to read"
    elif age is not None and timedelta(seconds=age) > timedelta(seconds=lease_seconds):
        status, detail = "stale", "no heartbeat within the lease: their jobs are re-queued when it expires"
    else:
        status, detail = "ok", None
    return DependencyHealth(status=status, required=False, latency_ms=latency, detail=detail, running_jobs=running,
                            queued_jobs=queued, last_heartbeat_seconds_ago=round(age, 1) if age is not None else None)


@router.get("/healthz", response_model=Health, responses={503: {
    **problem_responses(503)[503], "description": "A required dependency is down; the body's `checks` says which"}})
def healthz(request: Request, sessions: SessionsDep, settings: SettingsDep) -> Health | JSONResponse:
    database = _checks.submit(database_health, sessions)
    broker = _checks.submit(broker_health, request.app.state.broker_probe)
    checks = {"database": database.result(), "broker": broker.result()}
    if checks["database"].status == "ok":
        checks["worker"] = worker_health(sessions, settings.lease_seconds)
    else:
        checks["worker"] = DependencyHealth(status="unknown", required=False, latency_ms=None,
                                            detail="read from the database, which is down")
    down = [name for name, check in checks.items() if check.required and check.status != "ok"]
    if down:
        return problem_response(503, "service unavailable", f"down: {', '.join(down)}", str(request.url.path),
                                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                                checks={n: c.model_dump(mode="json") for n, c in checks.items()})
    return Health(status="ok", checks=checks)

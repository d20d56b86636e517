"""What one key may use: requests per minute, queued + running jobs, stored bytes (HUBTUNE_KEY_RATE_LIMIT,
HUBTUNE_KEY_MAX_ACTIVE_JOBS, HUBTUNE_KEY_MAX_BYTES; 0 is no limit). Refusals are 429 (with Retry-After) or 507
problem+json naming the limit and its value."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from service.api.problems import Problem
from service.contract import JobStatus
from service.db import Checkpoint, Dataset, Job
from service.settings import Settings

ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
# A full queue frees a slot when one of its jobs ends; jobs take minutes, so a client asks again after this long.
ACTIVE_JOBS_RETRY_SECONDS = 30


class RateLimiter:
    """A token bucket per key, in this API process: `per_minute` requests in a burst, refilled at per_minute / 60
    a second. With several API processes each counts its own requests (the limit is per process)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}  # owner -> (tokens, when counted)
        self._lock = threading.Lock()

    def wait_seconds(self, owner: str, now: float | None = None) -> float:
        """0 when `owner` may make a request now (and it is counted), else how long until it may."""
        if self.per_minute <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        rate = self.per_minute / 60.0
        with self._lock:
            tokens, then = self._buckets.get(owner, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - then) * rate)
            if tokens >= 1.0:
                self._buckets[owner] = (tokens - 1.0, now)
                return 0.0
            self._buckets[owner] = (tokens, now)
            return (1.0 - tokens) / rate


def check_rate(limiter: RateLimiter, owner: str) -> None:
    wait = limiter.wait_seconds(owner)
    if wait > 0:
        raise Problem(429, "too many requests", f"this key may make {limiter.per_minute} requests a minute "
                      "(HUBTUNE_KEY_RATE_LIMIT)", headers={"Retry-After": str(max(1, math.ceil(wait)))},
                      limit="HUBTUNE_KEY_RATE_LIMIT", limit_value=limiter.per_minute)


def check_active_jobs(session: Any, owner: str, settings: Settings) -> None:
    """429 when the key already has HUBTUNE_KEY_MAX_ACTIVE_JOBS jobs queued or running."""
    limit = settings.key_max_active_jobs
    if limit <= 0:
        return
    active = session.execute(select(func.count()).select_from(Job).where(
        Job.owner == owner, Job.status.in_(ACTIVE))).scalar_one()
    if active >= limit:
        raise Problem(429, "too many active jobs", f"this key has {active} jobs queued or running; "
                      f"HUBTUNE_KEY_MAX_ACTIVE_JOBS is {limit}: wait for one to end, or cancel one",
                      headers={"Retry-After": str(ACTIVE_JOBS_RETRY_SECONDS)},
                      limit="HUBTUNE_KEY_MAX_ACTIVE_JOBS", limit_value=limit)


def stored_bytes(session: Any, owner: str) -> int:
    """What the key stores: its datasets' bytes (as uploaded) and its jobs' checkpoint files."""
    datasets = session.execute(select(func.coalesce(func.sum(Dataset.size_bytes), 0))
                               .where(Dataset.owner == owner)).scalar_one()
    files = session.execute(select(Checkpoint.files).join(Job, Job.id == Checkpoint.job_id)
                            .where(Job.owner == owner)).scalars()
    return int(datasets) + sum(int(f.get("size") or 0) for listed in files for f in listed or [])


def check_stored_bytes(sessions: sessionmaker, owner: str, settings: Settings, adding: int = 0) -> None:
    """507 when the key's stored bytes, with `adding` more, would pass HUBTUNE_KEY_MAX_BYTES (with nothing more to
    add: when they have reached it)."""
    limit = settings.key_max_bytes
    if limit <= 0:
        return
    with sessions() as session:
        used = stored_bytes(session, owner)
    if used + adding > limit or (adding == 0 and used >= limit):
        more = f" and {adding} more" if adding else ""
        raise Problem(507, "storage limit reached", f"this key stores {used} bytes of datasets and checkpoints"
                      f"{more}; HUBTUNE_KEY_MAX_BYTES is {limit}", limit="HUBTUNE_KEY_MAX_BYTES",
                      limit_value=limit)

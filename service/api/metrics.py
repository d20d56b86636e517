"""Prometheus metrics of one API process (GET /metrics, text exposition format).

Request latency and upload bytes are observed as they happen, in this process. What the database knows (jobs by
status, the queue, candidate and job durations) is read at scrape time, so every API replica reports the same
figures and a restart loses nothing: counts by status are one GROUP BY over an indexed column; the durations are
read incrementally (rankings past the last id seen, jobs finished since the last scrape) into cumulative
histograms. The broker's own queue length is read where it is one cheap call (Redis LLEN, a folder listing)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.contract import JobPhase, JobStatus
from service.db import Job, RankingEntry, as_utc
from service.jobs import QUEUE_FOR_PHASE

log = logging.getLogger("hubtune.metrics")

# Seconds: a poll takes milliseconds, an upload or a create_job up to seconds.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Seconds: a candidate's features take from milliseconds (cached) to hours (a large model on CPU); a job the same.
WORK_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0, 12 * 3600.0)
UNMATCHED = "<unmatched>"  # a request no route answered: one series, however many raw paths there are


@dataclass
class ApiMetrics:
    """The metrics of one app (its own registry: two apps in one process, as in tests, never share series)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.requests = Histogram("hubtune_http_request_duration_seconds", "HTTP requests by route template, "
                                  "method and status", ["method", "route", "status"], buckets=REQUEST_BUCKETS,
                                  registry=self.registry)
        self.upload_bytes = Counter("hubtune_upload_bytes", "bytes of the datasets stored by uploads",
                                    registry=self.registry)
        self.uploads = Counter("hubtune_uploads", "datasets stored by uploads", registry=self.registry)

    def watch_database(self, sessions: sessionmaker, broker_length: Callable[[], dict[str, int]] | None) -> None:
        self.registry.register(DatabaseCollector(sessions, broker_length))

    def record_upload(self, size: int) -> None:
        self.uploads.inc()
        self.upload_bytes.inc(size)


def record_upload(app_state: Any, size: int) -> None:
    """Count one stored upload of `size` bytes (the upload route calls this once its row is committed)."""
    metrics: ApiMetrics | None = getattr(app_state, "metrics", None)
    if metrics is not None:
        metrics.record_upload(size)


class RequestMetrics:
    """Pure ASGI middleware timing every HTTP request into ApiMetrics.requests, labelled by the route's template
    (/v1/jobs/{job_id}, never the raw path: one series per route, not per job) and the status sent."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app, self.metrics = app, metrics
        self.prefixes: dict[int, str] = {}  # id of a route -> the routers' prefix above it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500  # what the client sees when the app raises before answering

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            template = self.template(scope)
            self.metrics.requests.labels(scope["method"], template, str(status)).observe(time.perf_counter() - began)

    def template(self, scope: Scope) -> str:
        """The full template of the route that answered: FastAPI's nested routers leave the route's own template
        (/jobs/{job_id}) in the scope, without the prefixes of the routers above it (/v1), which are static here:
        the prefix is the start of the path before the part the route's pattern matches (found once per route)."""
        route = scope.get("route")
        own = getattr(route, "path_format", None)
        if own is None:
            return UNMATCHED
        prefix = self.prefixes.get(id(route))
        if prefix is None:
            path = scope["path"]
            pattern = getattr(route, "path_regex", None)
            starts = [i for i, char in enumerate(path) if char == "/"]
            prefix = next((path[:i] for i in starts if pattern is not None and pattern.match(path[i:])), "")
            self.prefixes[id(route)] = prefix
        return prefix + own


class _Cumulative:
    """A histogram built from observations handed to it (a scrape's new rows), exposed as a metric family."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.bounds = buckets
        self.series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}  # labels -> (counts, [sum])

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        counts, total = self.series.setdefault(labels, ([0] * (len(self.bounds) + 1), [0.0]))
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound), len(self.bounds))
        counts[index] += 1
        total[0] += value

    def family(self, name: str, documentation: str, label_names: list[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=label_names)
        for labels, (counts, total) in sorted(self.series.items()):
            cumulative, running = [], 0
            for bound, count in zip([*map(str, self.bounds), "+Inf"], counts):
                running += count
                cumulative.append((bound, running))
            family.add_metric(list(labels), cumulative, total[0])
        return family


class DatabaseCollector(Collector):
    """Scrape-time figures read from the jobs table (see the module's docstring)."""

    def __init__(self, sessions: sessionmaker, broker_length: Callable[[], dict[str, int]] | None) -> None:
        self.sessions, self.broker_length = sessions, broker_length
        self.lock = threading.Lock()  # two scrapes at once read the new rows once
        self.last_ranking_id = 0
        self.finished_since: datetime | None = None
        self.finished_at_mark: set[str] = set()  # jobs finished exactly at finished_since, already counted
        self.feature_seconds = _Cumulative(WORK_BUCKETS)
        self.score_seconds = _Cumulative(WORK_BUCKETS)
        self.queue_wait = _Cumulative(WORK_BUCKETS)
        self.run_seconds = _Cumulative(WORK_BUCKETS)

    def describe(self) -> Iterable[Metric]:
        return []  # read from the database at each scrape, never at registration

    def collect(self) -> Iterator[Metric]:
        with self.lock, self.sessions() as session:
            counts = session.execute(select(Job.status, Job.phase, func.count()).group_by(Job.status, Job.phase)).all()
            self._read_new_rankings(session)
            self._read_new_finished_jobs(session)
        jobs = GaugeMetricFamily("hubtune_jobs", "jobs by status and phase", labels=["status", "phase"])
        by_key = {(status, phase): int(count) for status, phase, count in counts}
        for status in JobStatus:
            for phase in JobPhase:
                jobs.add_metric([status.value, phase.value], by_key.get((status.value, phase.value), 0))
        yield jobs
        depth = GaugeMetricFamily("hubtune_queue_depth", "queued jobs by the queue their phase goes to",
                                  labels=["queue"])
        for phase in JobPhase:
            depth.add_metric([QUEUE_FOR_PHASE[phase]], by_key.get((JobStatus.QUEUED.value, phase.value), 0))
        yield depth
        yield from self._broker()
        yield self.feature_seconds.family("hubtune_candidate_feature_seconds", "a ranked candidate's feature "
                                          "extraction (0 when its features were cached)", ["phase"])
        yield self.score_seconds.family("hubtune_candidate_score_seconds", "a ranked candidate's scoring, all its "
                                        "estimators together", ["phase"])
        yield self.queue_wait.family("hubtune_job_queue_wait_seconds", "a finished job's last claim after it was "
                                     "created", ["status"])
        yield self.run_seconds.family("hubtune_job_run_seconds", "a finished job's last phase, claim to end",
                                      ["status"])

    def _read_new_rankings(self, session: Any) -> None:
        rows = session.execute(select(RankingEntry.id, RankingEntry.feature_seconds, RankingEntry.details)
                               .where(RankingEntry.id > self.last_ranking_id).order_by(RankingEntry.id)).all()
        for entry_id, feature_seconds, details in rows:
            self.last_ranking_id = entry_id
            self.feature_seconds.observe((JobPhase.RANK.value,), float(feature_seconds or 0.0))
            scoring = (details or {}).get("score_seconds") or {}
            if isinstance(scoring, dict):
                self.score_seconds.observe((JobPhase.RANK.value,),
                                           sum(float(v) for v in scoring.values() if isinstance(v, int | float)))

    def _read_new_finished_jobs(self, session: Any) -> None:
        query = select(Job.id, Job.status, Job.created_at, Job.started_at, Job.finished_at).where(
            Job.finished_at.is_not(None))
        if self.finished_since is not None:
            query = query.where(Job.finished_at >= self.finished_since)
        for job_id, status, created_at, started_at, finished_at in session.execute(query.order_by(Job.finished_at)):
            finished = as_utc(finished_at)
            if finished == self.finished_since and job_id in self.finished_at_mark:
                continue
            if finished != self.finished_since:
                self.finished_since, self.finished_at_mark = finished, set()
            self.finished_at_mark.add(job_id)
            started = as_utc(started_at)
            if started is None:  # cancelled while queued
                continue
            self.queue_wait.observe((status,), max(0.0, (started - as_utc(created_at)).total_seconds()))
            self.run_seconds.observe((status,), max(0.0, (finished - started).total_seconds()))

    def _broker(self) -> Iterator[Metric]:
        if self.broker_length is None:
            return
        up = GaugeMetricFamily("hubtune_broker_up", "1 when the broker answered the queue-length read")
        try:
            lengths = self.broker_length()
        except Exception as exc:  # a broker that is down is a 0 here, and /healthz says why
            log.warning("metrics: broker queue length unavailable: %s", str(exc).splitlines()[0] if str(exc) else exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        messages = GaugeMetricFamily("hubtune_broker_queue_messages", "messages waiting on the broker",
                                     labels=["queue"])
        for queue, length in sorted(lengths.items()):
            messages.add_metric([queue], length)
        yield messages


def broker_queue_length(broker_url: str, queue_folder: Path, timeout_seconds: float
                        ) -> Callable[[], dict[str, int]] | None:
    """Messages waiting per queue: Redis LLEN of each queue's list (kombu keeps a queue as a list of its name);
    the filesystem broker's folder holds every queue's messages, counted together as "all"."""
    queues = sorted(set(QUEUE_FOR_PHASE.values()))
    if broker_url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        client = redis.Redis.from_url(broker_url, socket_timeout=timeout_seconds,
                                      socket_connect_timeout=timeout_seconds)

        def redis_lengths() -> dict[str, int]:
            pipe = client.pipeline(transaction=False)
            for queue in queues:
                pipe.llen(queue)
            return {queue: int(length) for queue, length in zip(queues, pipe.execute())}

        return redis_lengths
    if broker_url.startswith("filesystem"):
        def folder_length() -> dict[str, int]:
            with os.scandir(queue_folder) as entries:
                return {"all": sum(1 for entry in entries if entry.name.endswith(".msg"))}

        return folder_length
    return None

"""The FastAPI application: settings, database, broker sender and the reconciler wired to the routers of
service.api. Never imports torch or transformers: the API stays small, fast to start and CPU-only."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute

from service import jobs as job_states
from service.api.guards import HideServerPaths, KeylessGuard
from service.api.limits import install_body_limit
from service.api.main import api_router
from service.api.metrics import ApiMetrics, RequestMetrics, broker_queue_length
from service.api.problems import install_problems
from service.api.quotas import RateLimiter
from service.artifacts import ArtifactStoreUnavailable, ensure_artifact_store
from service.datasets import sweep_scratch
from service.db import DatabaseTimeouts, PoolLimits, session_factory
from service.security import keyless, server_path_pattern
from service.settings import Settings

log = logging.getLogger("hubtune.api")


def create_app(settings: Settings, send: job_states.SendTask | None = None, run_reconciler: bool = True) -> FastAPI:
    """The app for these settings. `send` puts a job id on the broker (default: the Celery app's send_task, with the
    broker timeouts of the settings)."""
    from service.migrate import upgrade

    settings.ensure_dirs()
    sweep_scratch(settings.upload_scratch_dir)  # what API processes killed mid-upload left
    try:
        ensure_artifact_store(settings)
    except ArtifactStoreUnavailable as exc:  # as with a database that is down: 503s until it answers
        log.warning("artifact store unavailable at start: %s", exc)
    upgrade(settings.sqlalchemy_url)
    if send is None:
        from workers.celery_app import make_celery

        send = job_states.celery_sender(make_celery(settings))
    app = FastAPI(title="HubTune", version="0.1.0", lifespan=_lifespan,
                  description="Rank hub models for your labelled dataset, then tune the best.",
                  generate_unique_id_function=_operation_id)
    # What the dependencies of service.api.deps read.
    app.state.settings = settings
    app.state.sessions = session_factory(settings.sqlalchemy_url, DatabaseTimeouts.from_settings(settings),
                                         PoolLimits.from_settings(settings))
    app.state.send = send
    app.state.broker_probe = job_states.broker_probe(settings.celery_broker_url, settings.broker_dir / "queue",
                                                     settings.broker_timeout_seconds)
    app.state.keyless = keyless(settings)
    app.state.run_reconciler = run_reconciler
    app.state.rate_limiter = RateLimiter(settings.key_rate_limit)
    app.state.metrics = ApiMetrics()
    app.state.metrics.watch_database(app.state.sessions, broker_queue_length(
        settings.celery_broker_url, settings.broker_dir / "queue", settings.broker_timeout_seconds))
    install_problems(app)
    install_body_limit(app, settings)
    app.add_middleware(HideServerPaths, pattern=server_path_pattern(settings))
    if app.state.keyless:  # added last: the outermost, so a refused request reaches nothing else
        app.add_middleware(KeylessGuard, settings=settings)
    # the outermost of all: it times and counts every request, refused ones too
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)
    app.include_router(api_router)
    return app


def _operation_id(route: APIRoute) -> str:
    """The OpenAPI operationId: the route function's name (list_datasets, create_job...)."""
    return route.name


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The reconciler runs while the app serves; keyless mode is announced in the log."""
    state = app.state
    reconciler = None
    if state.run_reconciler:
        reconciler = job_states.Reconciler(state.sessions, state.send, state.settings.reconcile_seconds,
                                           state.settings.max_attempts,
                                           state.settings.requeue_queued_after_seconds)
        reconciler.start()
    if state.keyless:
        log.warning("HubTune API on %s without required API keys (loopback only); requests without a key "
                    "act as the local user", state.settings.bind_host)
    yield
    if reconciler:
        reconciler.stop()

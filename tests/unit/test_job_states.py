"""The job state machine: compare-and-set claims, leases, reconciliation, cancel (on SQLite, in process)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from service import jobs as job_states
from service.db import Dataset, Job, session_factory, utcnow
from service.migrate import upgrade


def seed_job(factory, candidates: list[str] | None = None, **job: object) -> None:  # type: ignore[no-untyped-def]
    """Dataset d1 and its queued job j1."""
    with factory.begin() as session:
        session.add(Dataset(id="d1", owner="o", filename="f.csv", format="csv", task="classification",
                            text_column="text", label_column="label", rows=2, sha256="0" * 64, size_bytes=1,
                            storage_path="/nowhere"))
        session.add(Job(id="j1", owner="o", dataset_id="d1", candidates=candidates or ["m"], metrics=["logme"],
                        **job))


@pytest.fixture
def sessions(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    factory = session_factory(url)
    seed_job(factory)
    return factory


def job(sessions, job_id: str = "j1") -> Job:
    with sessions() as session:
        return session.get(Job, job_id)


def test_only_one_worker_claims(sessions) -> None:
    assert job_states.claim(sessions, "j1", "rank", "worker-a", 30)
    assert not job_states.claim(sessions, "j1", "rank", "worker-b", 30)
    assert not job_states.claim(sessions, "j1", "tune", "worker-b", 30)  # wrong phase
    row = job(sessions)
    assert (row.status, row.worker_token, row.attempts) == ("running", "worker-a", 1)


def test_expired_lease_is_reclaimable_and_old_owner_loses_writes(sessions) -> None:
    assert job_states.claim(sessions, "j1", "rank", "worker-a", 0.05)
    time.sleep(0.1)
    assert job_states.claim(sessions, "j1", "rank", "worker-b", 30)
    assert not job_states.renew_lease(sessions, "j1", "worker-a", 30)
    with pytest.raises(job_states.LeaseLost):
        job_states.report_progress(sessions, "j1", "worker-a", "features", 0.5)
    with pytest.raises(job_states.LeaseLost):
        with sessions.begin() as session:
            job_states.finish(session, "j1", "worker-a", status="succeeded")
    assert job(sessions).attempts == 2


def test_reconciler_requeues_dead_workers_job_then_gives_up(sessions) -> None:
    sent: list[tuple[str, str, str]] = []
    send = lambda task, job_id, queue: sent.append((task, job_id, queue))  # noqa: E731
    assert job_states.claim(sessions, "j1", "rank", "worker-a", 0.01)
    time.sleep(0.05)
    assert job_states.reconcile_once(sessions, send, max_attempts=3, requeue_queued_after_seconds=3600) == ["j1"]
    assert sent == [("hubtune.rank", "j1", "rank")]
    row = job(sessions)
    assert row.status == "queued" and row.worker_token is None and row.enqueued_at is not None
    # A live lease is left alone.
    assert job_states.claim(sessions, "j1", "rank", "worker-b", 60)
    assert job_states.reconcile_once(sessions, send, 3, 3600) == []
    # The third death is final.
    with sessions.begin() as session:
        session.execute(update(Job).values(attempts=3, lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert job_states.reconcile_once(sessions, send, 3, 3600) == []
    row = job(sessions)
    assert row.status == "failed" and "died 3 times" in row.error


def test_reconciler_resends_queued_job_whose_message_was_lost(sessions) -> None:
    sent: list[str] = []
    send = lambda task, job_id, queue: sent.append(job_id)  # noqa: E731
    assert job_states.reconcile_once(sessions, send, 3, requeue_queued_after_seconds=3600) == []
    with sessions.begin() as session:
        session.execute(update(Job).values(created_at=utcnow() - timedelta(hours=2)))
    assert job_states.reconcile_once(sessions, send, 3, requeue_queued_after_seconds=3600) == ["j1"]
    assert job_states.reconcile_once(sessions, send, 3, requeue_queued_after_seconds=3600) == []  # just re-sent
    assert sent == ["j1"]


def test_cancel_queued_and_running(sessions) -> None:
    assert job_states.request_cancel(sessions, "j1") == "cancelled"
    assert not job_states.claim(sessions, "j1", "rank", "w", 30)
    with sessions.begin() as session:
        session.add(Job(id="j2", owner="o", dataset_id="d1", candidates=["m"], metrics=["logme"]))
    assert job_states.claim(sessions, "j2", "rank", "w", 30)
    assert job_states.request_cancel(sessions, "j2") == "running"
    with pytest.raises(job_states.JobCancelled):
        job_states.report_progress(sessions, "j2", "w", "features", 0.1)


def test_api_process_never_imports_torch() -> None:
    code = ("import sys, service.app, service.catalog, service.cli, service.client, workers.celery_app; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@contextmanager
def scratch_database(kind: str, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database: a SQLite file, or a PostgreSQL database dropped afterwards."""
    import uuid

    from tests.integration.conftest import PG_ADMIN_URL, postgres_available

    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'scratch.db'}"
        return
    if not postgres_available():
        pytest.skip("PostgreSQL not reachable")
    import psycopg

    database = f"hubtune_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {database}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{database}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_migrations_build_the_schema_the_models_declare(kind: str, tmp_path: Path) -> None:
    """Alembic's head and service.db's tables agree (a column added to a model without a migration fails here)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from service.db import Base, make_engine

    with scratch_database(kind, tmp_path) as url:
        upgrade(url)
        engine = make_engine(url)
        try:
            with engine.connect() as connection:
                differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        finally:
            engine.dispose()
    assert differences == []


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_json_columns_store_nan_and_infinity_as_null(kind: str, tmp_path: Path) -> None:
    """A diverged training run reports NaN losses; PostgreSQL's json type rejects NaN (the job would fail while
    recording its results) and the API's responses refuse it, so JSON columns write null instead."""
    import math

    with scratch_database(kind, tmp_path) as url:
        upgrade(url)
        factory = session_factory(url)
        tuning = {"models": [{"metrics": {"val_loss": math.nan, "accuracy": 0.5},
                              "trials": [{"tradeoff": 10.0, "val_loss": math.inf}, (1.0, -math.inf)]}]}
        seed_job(factory, tuning=tuning)
        with factory() as session:
            stored = session.get(Job, "j1").tuning
        assert stored == {"models": [{"metrics": {"val_loss": None, "accuracy": 0.5},
                                      "trials": [{"tradeoff": 10.0, "val_loss": None}, [1.0, None]]}]}


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_stage_longer_than_its_column_is_cut_not_an_error(kind: str, tmp_path: Path) -> None:
    """Successive halving's stages name the round, the row count and the model: with a long model name they
    pass the column's 64 characters, which PostgreSQL refuses (the job failed on a progress report)."""
    with scratch_database(kind, tmp_path) as url:
        upgrade(url)
        factory = session_factory(url)
        seed_job(factory)
        assert job_states.claim(factory, "j1", "rank", "w", 30)
        stage = "round 3/4 (1024 rows), features 7/8: all-mpnet-base-v2-first-8-layers-distilled"
        job_states.report_progress(factory, "j1", "w", stage, 0.5)
        assert job(factory).stage == stage[:job_states.STAGE_LENGTH]
        factory.kw["bind"].dispose()

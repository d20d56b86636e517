"""Dependencies that are down (issue 19, items 9 and 11), in process: a job whose message could not be sent is sent
at the reconciler's next pass; a locked database is a 503 with Retry-After within the busy timeout; /healthz names
each dependency; the OpenAPI document describes every error as the problem+json it is. The same on real, stopped and
frozen servers: tests/integration/test_outages.py."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service import jobs as job_states
from service.app import create_app
from service.db import Job
from service.settings import Settings
from tests.unit.test_job_states import job, sessions  # noqa: F401  (the fixture)


def broken_send(*_args: object) -> None:
    raise ConnectionRefusedError("the broker is down")


def test_a_job_whose_send_failed_is_sent_at_the_next_pass(sessions) -> None:  # noqa: F811
    assert not job_states.enqueue(sessions, broken_send, "j1", "rank")
    row = job(sessions)
    assert (row.status, row.stage, row.enqueued_at) == ("queued", job_states.UNSENT_STAGE, None)

    sent: list[tuple] = []
    # not after requeue_queued_after_seconds (an hour here): at once
    assert job_states.reconcile_once(sessions, lambda *a: sent.append(a), 3, 3600) == ["j1"]
    assert sent == [("hubtune.rank", "j1", "rank")]
    row = job(sessions)
    assert row.stage == "queued" and row.enqueued_at is not None
    assert job_states.reconcile_once(sessions, lambda *a: sent.append(a), 3, 3600) == []  # sent once


def test_a_pass_stops_at_the_first_send_the_broker_refuses(sessions) -> None:  # noqa: F811
    with sessions.begin() as session:
        first = session.get(Job, "j1")
        session.add(Job(id="j2", owner="o", dataset_id=first.dataset_id, candidates=["m"], metrics=["logme"]))
    for job_id in ("j1", "j2"):
        job_states.enqueue(sessions, broken_send, job_id, "rank")
    calls: list[tuple] = []

    def still_down(*args: object) -> None:
        calls.append(args)
        raise TimeoutError("no answer")

    assert job_states.reconcile_once(sessions, still_down, 3, 3600) == []
    assert len(calls) == 1  # one timeout per pass while the broker is down, not one per job
    assert {job(sessions, j).stage for j in ("j1", "j2")} == {job_states.UNSENT_STAGE}


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    settings = Settings(home=tmp_path / "home", auth="auto", bind_host="127.0.0.1", db_statement_timeout_seconds=0.5)
    return TestClient(create_app(settings, send=lambda *a: None, run_reconciler=False), raise_server_exceptions=False,
                      base_url="http://127.0.0.1")  # keyless mode answers loopback hosts only


def test_a_database_locked_past_its_busy_timeout_is_a_503_with_retry_after(client: TestClient,
                                                                             tmp_path: Path) -> None:
    lock = sqlite3.connect(tmp_path / "home" / "hubtune.db", isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        response = client.post("/v1/models", json={"source": "hf", "repo_id": "org/locked"})
        took = time.monotonic() - started
    finally:
        lock.close()
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert int(response.headers["retry-after"]) > 0 and response.json()["dependency"] == "database"
    assert took < 3, took
    assert client.post("/v1/models", json={"source": "hf", "repo_id": "org/locked"}).status_code == 201


def test_healthz_reports_each_dependency_and_503s_when_a_required_one_is_down(client: TestClient,
                                                                               tmp_path: Path) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200, health.text
    checks = health.json()["checks"]
    assert checks["database"]["status"] == "ok" and checks["database"]["required"]
    assert checks["broker"]["status"] == "ok" and checks["broker"]["latency_ms"] >= 0
    assert checks["worker"]["status"] == "unknown" and not checks["worker"]["required"]

    shutil.rmtree(tmp_path / "home" / "broker" / "queue")  # the filesystem broker's folder is gone
    down = client.get("/healthz")
    assert down.status_code == 503 and down.headers["content-type"].startswith("application/problem+json")
    assert down.headers["retry-after"]
    assert down.json()["checks"]["broker"]["status"] == "down" and down.json()["checks"]["database"]["status"] == "ok"


def test_openapi_documents_every_error_as_problem_details(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert operation["operationId"].isidentifier()
            for status, response in responses.items():
                if status[0] in "45":
                    assert list(response["content"]) == ["application/problem+json"], (method, path, status)
                    assert response["content"]["application/problem+json"]["schema"] == {
                        "$ref": "#/components/schemas/ProblemDetail"}
            assert "Retry-After" in responses["503"]["headers"], (method, path)
            if path.startswith("/v1"):
                assert "401" in responses and "WWW-Authenticate" in responses["401"]["headers"], (method, path)
    assert "400" in document["paths"]["/v1/datasets"]["post"]["responses"]  # a multipart body it cannot parse

"""GET /metrics (issue 20, load and observability): who may read it, and that its series exist and move with what
the API does and what the database holds. The app in-process on SQLite (and PostgreSQL where it matters); rows a
worker would write are written as workers/runner.py writes them."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.db import HubModel, Job, RankingEntry, utcnow
from service.security import ADMIN
from tests.unit.test_job_states import scratch_database
from tests.unit.test_keys_isolation import CSV, Server, make_server, problem, upload


def scrape(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:  # type: ignore[no-untyped-def]
    """Every sample of a scrape, keyed by (sample name, sorted labels)."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def finished_rank_job(server: Server, owner: str, dataset_id: str, seconds: float) -> str:
    """A rank job that ran `seconds` with two ranked candidates, as the runner commits it."""
    job_id, models = uuid.uuid4().hex, [uuid.uuid4().hex, uuid.uuid4().hex]
    now = utcnow()
    with server.sessions.begin() as session:
        session.add_all(HubModel(id=m, name=f"m-{m[:4]}", source="hf", locator=f"org/{m}") for m in models)
        session.add(Job(id=job_id, owner=owner, dataset_id=dataset_id, candidates=models, metrics=["logme"],
                        status="succeeded", stage="done", progress=1.0, created_at=now - timedelta(seconds=seconds + 2),
                        started_at=now - timedelta(seconds=seconds), finished_at=now))
    with server.sessions.begin() as session:
        session.add_all(RankingEntry(job_id=job_id, model_id=m, rank=i + 1, scores={"logme": 0.1}, feature_seconds=3.0,
                                     details={"score_seconds": {"logme": 0.25}}) for i, m in enumerate(models))
    return job_id


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_metrics_series_exist_and_move(kind: str, tmp_path: Path) -> None:
    with scratch_database(kind, tmp_path) as url:
        server = make_server(tmp_path, url)
        admin, admin_id = server.key(ADMIN)
        before = scrape(admin)
        assert value(before, "hubtune_jobs", status="queued", phase="rank") == 0
        assert value(before, "hubtune_broker_up") == 1  # the filesystem broker's folder
        created = upload(admin)
        assert created.status_code == 201, created.text
        assert admin.get(f"/v1/jobs/{uuid.uuid4().hex}").status_code == 404
        finished_rank_job(server, admin_id, created.json()["id"], seconds=40.0)
        with server.sessions.begin() as session:
            session.add(Job(owner=admin_id, dataset_id=created.json()["id"], candidates=["x"], metrics=["logme"]))
        after = scrape(admin)
        assert value(after, "hubtune_upload_bytes_total") - value(before, "hubtune_upload_bytes_total") == len(CSV)
        assert value(after, "hubtune_uploads_total") == value(before, "hubtune_uploads_total") + 1
        # request latency per route template, never per raw path
        assert value(after, "hubtune_http_request_duration_seconds_count", method="POST", route="/v1/datasets",
                     status="201") == 1
        assert value(after, "hubtune_http_request_duration_seconds_count", method="GET", route="/v1/jobs/{job_id}",
                     status="404") == 1
        assert not any("/v1/jobs/" in dict(labels).get("route", "") and "{" not in dict(labels)["route"]
                       for _name, labels in after)
        assert value(after, "hubtune_jobs", status="succeeded", phase="rank") == 1
        assert value(after, "hubtune_jobs", status="queued", phase="rank") == 1
        assert value(after, "hubtune_queue_depth", queue="rank") == 1
        assert value(after, "hubtune_candidate_feature_seconds_count", phase="rank") == 2
        assert value(after, "hubtune_candidate_feature_seconds_sum", phase="rank") == pytest.approx(6.0)
        assert value(after, "hubtune_candidate_feature_seconds_bucket", phase="rank", le="1.0") == 0
        assert value(after, "hubtune_candidate_feature_seconds_bucket", phase="rank", le="5.0") == 2
        assert value(after, "hubtune_candidate_score_seconds_sum", phase="rank") == pytest.approx(0.5)
        assert value(after, "hubtune_job_run_seconds_count", status="succeeded") == 1
        assert value(after, "hubtune_job_run_seconds_sum", status="succeeded") == pytest.approx(40.0, abs=0.01)
        assert value(after, "hubtune_job_queue_wait_seconds_sum", status="succeeded") == pytest.approx(2.0, abs=0.01)
        # read incrementally: a further scrape counts nothing twice, and a job finished since is added once
        finished_rank_job(server, admin_id, created.json()["id"], seconds=1.0)
        again = scrape(admin)
        assert value(again, "hubtune_candidate_feature_seconds_count", phase="rank") == 4
        assert value(again, "hubtune_job_run_seconds_count", status="succeeded") == 2
        assert value(scrape(admin), "hubtune_job_run_seconds_count", status="succeeded") == 2


def test_metrics_need_an_admin_key_or_the_keyless_local_user(tmp_path: Path) -> None:
    server = make_server(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    problem(server.client().get("/metrics"), 401)
    user, _ = server.key()
    assert "admin" in problem(user.get("/metrics"), 403)["title"]
    keyless = make_server(tmp_path / "keyless", f"sqlite:///{tmp_path / 'keyless.sqlite'}", auth="auto")
    local = keyless.client(base_url="http://127.0.0.1:8000")
    assert "hubtune_jobs" in local.get("/metrics").text
    problem(keyless.client(base_url="http://example.com").get("/metrics"), 421)  # the keyless Host check first
    # the refused requests were timed too; no route matched before the guard: one series for all of them
    samples = scrape(local)
    assert value(samples, "hubtune_http_request_duration_seconds_count", method="GET", route="<unmatched>",
                 status="421") == 1

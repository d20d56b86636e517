"""Cheap polling (issue 20): GET /v1/jobs/{id} and /v1/jobs/{id}/status carry a strong ETag; If-None-Match with it
is a 304 without a body while the job is unchanged, and a new ETag (and a 200) once it moves, as the worker moves
it (service/jobs.py's transitions). The app in-process on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from service import jobs as job_states
from service.db import Job, utcnow
from service.security import ADMIN
from tests.unit.test_job_states import scratch_database
from tests.unit.test_keys_isolation import make_server, problem, upload

BOTH = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.mark.parametrize("kind", BOTH)
@pytest.mark.parametrize("view", ["", "/status"])
def test_etag_round_trip_304_and_a_new_etag_when_the_job_moves(kind: str, view: str, tmp_path: Path) -> None:
    with scratch_database(kind, tmp_path) as url:
        server = make_server(tmp_path, url)
        user, owner = server.key()
        dataset = upload(user).json()["id"]
        job_id = uuid.uuid4().hex
        with server.sessions.begin() as session:
            session.add(Job(id=job_id, owner=owner, dataset_id=dataset, candidates=["m"], metrics=["logme"]))
        path = f"/v1/jobs/{job_id}{view}"
        first = user.get(path)
        assert first.status_code == 200 and first.json()["status"] == "queued"
        etag = first.headers["etag"]
        assert etag.startswith('"') and etag.endswith('"')
        assert first.headers["cache-control"] == "private, no-cache"  # a browser keeps it and asks again each time
        assert user.get(path).headers["etag"] == etag  # stable while nothing changes
        unchanged = user.get(path, headers={"If-None-Match": etag})
        assert unchanged.status_code == 304 and unchanged.content == b"" and unchanged.headers["etag"] == etag
        assert user.get(path, headers={"If-None-Match": f'"other", W/{etag}'}).status_code == 304  # a list, weak
        assert user.get(path, headers={"If-None-Match": '"other"'}).status_code == 200
        # the worker claims it, reports progress, finishes: each is a new ETag and a 200 with the new state
        token, seen = uuid.uuid4().hex, {etag}
        assert job_states.claim(server.sessions, job_id, "rank", token, 60)
        for move in (lambda: None,
                     lambda: job_states.report_progress(server.sessions, job_id, token, "features 1/1", 0.5),
                     lambda: job_states.report_progress(server.sessions, job_id, token, "features 1/1", 0.75)):
            move()
            moved = user.get(path, headers={"If-None-Match": etag})
            assert moved.status_code == 200, moved.text
            etag = moved.headers["etag"]
            assert etag not in seen
            seen.add(etag)
            assert user.get(path, headers={"If-None-Match": etag}).status_code == 304
        assert moved.json()["progress"] == 0.75
        with server.sessions.begin() as session:
            job_states.finish(session, job_id, token, status="succeeded", stage="done", progress=1.0,
                              finished_at=utcnow())
        done = user.get(path, headers={"If-None-Match": etag})
        assert done.status_code == 200 and done.json()["status"] == "succeeded" and done.headers["etag"] not in seen


def test_the_etag_differs_by_view_and_role_and_another_keys_job_is_a_404(tmp_path: Path) -> None:
    server = make_server(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    admin, owner = server.key(ADMIN)
    other, _ = server.key()
    dataset = upload(admin).json()["id"]
    job_id = uuid.uuid4().hex
    with server.sessions.begin() as session:
        session.add(Job(id=job_id, owner=owner, dataset_id=dataset, candidates=["m"], metrics=["logme"]))
    full, status = admin.get(f"/v1/jobs/{job_id}"), admin.get(f"/v1/jobs/{job_id}/status")
    assert full.headers["etag"] != status.headers["etag"]
    assert set(status.json()) == {"id", "status", "phase", "stage", "progress", "error", "attempts", "finished_at"}
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/status"):
        # another key learns nothing, not even with the owner's ETag
        problem(other.get(path, headers={"If-None-Match": full.headers["etag"]}), 404)
        problem(other.get(path, headers={"If-None-Match": "*"}), 404)


def test_a_page_of_jobs_shows_each_jobs_own_ranking(tmp_path: Path) -> None:
    """GET /v1/jobs reads the page's rankings in one query: each job still shows its own entries, best first."""
    from service.db import HubModel, RankingEntry

    server = make_server(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    user, owner = server.key()
    dataset = upload(user).json()["id"]
    models = [uuid.uuid4().hex for _ in range(3)]
    jobs = [uuid.uuid4().hex for _ in range(3)]
    with server.sessions.begin() as session:
        session.add_all(HubModel(id=m, name=f"m{i}", source="hf", locator=f"org/{m}") for i, m in enumerate(models))
        session.add_all(Job(id=j, owner=owner, dataset_id=dataset, candidates=models, metrics=["logme"],
                            status="succeeded", stage="done", progress=1.0) for j in jobs)
    with server.sessions.begin() as session:
        for n, job_id in enumerate(jobs[:2]):  # the third is not ranked
            order = models[n:] + models[:n]
            session.add_all(RankingEntry(job_id=job_id, model_id=m, rank=r + 1, scores={"logme": -r}, details={},
                                         feature_seconds=0.0) for r, m in enumerate(order))
    listed = {item["id"]: item for item in user.get("/v1/jobs").json()["items"]}
    for n, job_id in enumerate(jobs[:2]):
        assert [e["model_id"] for e in listed[job_id]["ranking"]] == models[n:] + models[:n]
        assert listed[job_id]["ranking"] == user.get(f"/v1/jobs/{job_id}").json()["ranking"]
    assert listed[jobs[2]]["ranking"] == []

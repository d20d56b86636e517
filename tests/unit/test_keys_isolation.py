"""Who may read what (issue 19, items 1-3): with HUBTUNE_AUTH=required and two user keys A and B (and an admin),
B cannot register A's checkpoint folder, learns nothing about server folders, never sees a server path, cannot
see, use or remove A's catalog entries; the keyless mode refuses foreign Host and Origin headers; per-key limits
answer 429 and 507; keys expire and are revoked; migration 0005 keeps existing keys and models working.

Through HTTP (TestClient, the app in-process) on SQLite and PostgreSQL where the database matters. Rows a worker
would write (a finished job, its checkpoint) are written as workers/runner.py writes them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import sessionmaker

from service.app import create_app
from service.db import ApiKey, Checkpoint, Job, session_factory, utcnow
from service.security import ADMIN, HIDDEN_PATH, USER, create_key
from service.settings import Settings
from tests.unit.test_job_states import scratch_database

BOTH = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
CSV = b"text,label\nhello there,a\nworld peace,b\n"
BERT = {"model_type": "bert", "vocab_size": 10, "hidden_size": 8, "architectures": ["BertModel"]}


@dataclass
class Server:
    settings: Settings
    sessions: sessionmaker
    app: Any
    roots: Path

    def client(self, key: str | None = None, **kwargs: Any) -> TestClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return TestClient(self.app, headers=headers, raise_server_exceptions=False, **kwargs)

    def key(self, role: str = USER, expires_in: timedelta | None = None, **client: Any) -> tuple[TestClient, str]:
        """A client with a new key of this role, and the key's id (the owner of what it creates)."""
        key, row = create_key(self.sessions, f"{role}-{uuid.uuid4().hex[:6]}", role, expires_in)
        return self.client(key, **client), row.id


def make_server(tmp: Path, url: str, **settings: Any) -> Server:
    roots = tmp / "roots"
    roots.mkdir(parents=True, exist_ok=True)
    values = {"home": tmp / "home", "database_url": url, "auth": "required", "bind_host": "127.0.0.1",
              "model_roots": str(roots), **settings}
    config = Settings(**values)
    app = create_app(config, send=lambda *a: None, run_reconciler=False)
    return Server(config, session_factory(config.sqlalchemy_url), app, roots)


@pytest.fixture(scope="module", params=BOTH)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Keys required, HUBTUNE_MODEL_ROOTS set; one app per database for the module (tests make their own keys)."""
    tmp = tmp_path_factory.mktemp(request.param)
    with scratch_database(request.param, tmp) as url:
        yield make_server(tmp, url)


def problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


def model_folder(folder: Path, config: dict | None = None) -> Path:
    """A folder the catalog accepts as a text model (config.json and a tokenizer file)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or BERT))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def upload(client: TestClient, content: bytes = CSV) -> httpx.Response:
    return client.post("/v1/datasets", files={"file": ("d.csv", content)}, data={"task": "classification"})


def register_local(client: TestClient, folder: Path) -> httpx.Response:
    return client.post("/v1/models", json={"source": "local", "path": str(folder)})


def tuned_checkpoint(server: Server, tenant: TestClient, owner: str, model_id: str,
                     name: str = "bert-tuned") -> tuple[str, Path]:
    """A finished tune job of `owner` with one checkpoint, as the worker leaves them: (job id, checkpoint folder)."""
    dataset = upload(tenant)
    assert dataset.status_code == 201, dataset.text
    job_id = uuid.uuid4().hex
    head = {**BERT, "architectures": ["BertForSequenceClassification"], "id2label": {"0": "a", "1": "b"}}
    folder = model_folder(server.settings.jobs_dir / job_id / "checkpoints" / name, head)
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    files = [{"path": p.name, "size": p.stat().st_size, "sha256": "0" * 64} for p in sorted(folder.iterdir())]
    with server.sessions.begin() as session:
        session.add(Job(id=job_id, owner=owner, dataset_id=dataset.json()["id"], candidates=[model_id],
                        metrics=["logme"], status="succeeded", phase="tune", stage="done", progress=1.0,
                        tune={"strategy": "finetune"}))
    with server.sessions.begin() as session:
        session.add(Checkpoint(job_id=job_id, name=name, model_id=model_id, path=str(folder), files=files))
    return job_id, folder


def catalog_model(server: Server, admin: TestClient) -> str:
    """An admin's local model below the roots: a shared catalog entry."""
    created = register_local(admin, model_folder(server.roots / f"m-{uuid.uuid4().hex[:6]}"))
    assert created.status_code == 201, created.text
    return created.json()["id"]


# ---- item 1: another tenant's fine-tuned weights ----------------------------------------------------------------

def test_no_user_key_registers_a_local_folder_and_every_refusal_is_the_same(server: Server, tmp_path: Path) -> None:
    """B tried A's checkpoint folder and got 201 (then A's weights); folders' existence leaked through distinct
    422s. Now every local registration by a user key gets one 403, whatever the folder."""
    admin, _ = server.key(ADMIN)
    a, a_id = server.key()
    b, _ = server.key()
    _, a_checkpoint = tuned_checkpoint(server, a, a_id, catalog_model(server, admin))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    tries = [a_checkpoint, a_checkpoint.parent, model_folder(server.roots / "below-roots"), Path("/nonexistent/x"),
             a_file, tmp_path, Path("relative/folder"), server.settings.home_dir]
    bodies = [problem(register_local(b, folder), 403) for folder in tries]
    assert all(body == bodies[0] for body in bodies), bodies
    assert bodies[0]["field"] == "path" and "HUBTUNE_MODEL_ROOTS" in bodies[0]["detail"]
    names = {m["name"] for m in b.get("/v1/models").json()["items"]}
    assert "bert-tuned" not in names and "below-roots" not in names


def test_an_admin_registers_only_below_the_roots_and_outside_hubtune_state(server: Server, tmp_path: Path) -> None:
    admin, _ = server.key(ADMIN)
    a, a_id = server.key()
    _, a_checkpoint = tuned_checkpoint(server, a, a_id, catalog_model(server, admin))
    inside = model_folder(server.roots / f"ok-{uuid.uuid4().hex[:6]}")
    assert register_local(admin, inside).status_code == 201
    outside = model_folder(tmp_path / "outside")
    into_home = server.roots / f"link-home-{uuid.uuid4().hex[:6]}"
    into_home.symlink_to(a_checkpoint)  # below the roots by name, inside HUBTUNE_HOME once resolved
    out_of_roots = server.roots / f"link-out-{uuid.uuid4().hex[:6]}"
    out_of_roots.symlink_to(outside)
    dotdot = server.roots / ".." / "home"
    refused = [problem(register_local(admin, p), 403) for p in
               (a_checkpoint, outside, into_home, out_of_roots, dotdot, Path("/nonexistent/x"), Path("rel"))]
    assert all(body == refused[0] for body in refused)
    # below the roots, an admin learns why a folder is no model (that folder is the admin's to know)
    missing = problem(register_local(admin, server.roots / "not-there"), 422)
    assert missing["field"] == "path"


def test_roots_that_hold_hubtune_home_still_refuse_its_folders(tmp_path: Path) -> None:
    server = make_server(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", model_roots=str(tmp_path))
    admin, _ = server.key(ADMIN)
    a, a_id = server.key()
    _, a_checkpoint = tuned_checkpoint(server, a, a_id, catalog_model(server, admin))
    problem(register_local(admin, a_checkpoint), 403)
    assert register_local(admin, model_folder(tmp_path / "elsewhere")).status_code == 201


def test_without_roots_keys_required_means_no_local_folder(tmp_path: Path) -> None:
    server = make_server(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", model_roots="")
    admin, _ = server.key(ADMIN)
    problem(register_local(admin, model_folder(tmp_path / "m")), 403)


def test_keyless_local_user_is_the_admin_and_registers_any_folder_as_before(tmp_path: Path) -> None:
    server = make_server(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", auth="auto", model_roots="")
    local = server.client(base_url="http://127.0.0.1:8000")
    created = register_local(local, model_folder(tmp_path / "anywhere"))
    assert created.status_code == 201 and created.json()["shared"] is True
    assert created.json()["path"] == str((tmp_path / "anywhere").resolve())  # the admin sees the path
    assert problem(register_local(local, tmp_path / "missing"), 422)["field"] == "path"  # as before
    # a user key on the same server is still a user
    user, _ = server.key(base_url="http://127.0.0.1:8000")
    problem(register_local(user, model_folder(tmp_path / "other")), 403)


def test_a_users_checkpoint_becomes_its_own_candidate_and_no_one_elses(server: Server) -> None:
    admin, _ = server.key(ADMIN)
    a, a_id = server.key()
    b, _ = server.key()
    job_id, _ = tuned_checkpoint(server, a, a_id, catalog_model(server, admin))
    body = {"source": "checkpoint", "job_id": job_id, "name": "bert-tuned"}
    b_try = problem(b.post("/v1/models", json=body), 404)
    assert b_try["title"] == "job not found"
    assert problem(b.post("/v1/models", json={**body, "job_id": uuid.uuid4().hex}), 404)["title"] == b_try["title"]
    created = a.post("/v1/models", json=body)
    assert created.status_code == 201, created.text
    entry = created.json()
    assert entry["source"] == "checkpoint" and entry["shared"] is False and entry["path"] is None
    assert entry["name"] == f"{job_id}/bert-tuned" and entry["has_source_head"] is True
    assert a.post("/v1/models", json=body).status_code == 200  # registered once
    assert problem(a.post("/v1/models", json={**body, "name": "nope"}), 404)["field"] == "name"
    assert problem(a.post("/v1/models", json={"source": "checkpoint", "job_id": job_id}), 422)["field"] == "name"
    a_data, b_data = upload(a).json()["id"], upload(b).json()["id"]
    assert entry["id"] in a.post("/v1/jobs", json={"dataset_id": a_data}).json()["candidates"]
    assert entry["id"] not in b.post("/v1/jobs", json={"dataset_id": b_data}).json()["candidates"]
    assert problem(b.post("/v1/jobs", json={"dataset_id": b_data, "candidates": [entry["id"]]}), 422)[
        "field"] == "candidates[0]"
    assert entry["id"] not in {m["id"] for m in admin.get("/v1/models").json()["items"]}


def test_no_server_path_reaches_a_user_key(server: Server) -> None:
    """GET /v1/models showed every local model's folder to every key; job errors and tuning summaries name
    folders too. A user key sees none of them; an admin sees the catalog's folders."""
    admin, _ = server.key(ADMIN)
    a, a_id = server.key()
    model_id = catalog_model(server, admin)
    job_id, folder = tuned_checkpoint(server, a, a_id, model_id)
    home, root = str(server.settings.home_dir), str(server.roots.resolve())
    with server.sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(
            error=f"could not load {root}/m-x/model.safetensors: truncated",
            tuning={"models": [{"model": "m", "checkpoint_dir": str(folder), "metrics": {"accuracy": 0.5}}]}))
    a.post("/v1/models", json={"source": "checkpoint", "job_id": job_id, "name": "bert-tuned"})
    bodies = [a.get("/v1/models"), a.get(f"/v1/jobs/{job_id}"), a.get("/v1/jobs"),
              a.get(f"/v1/jobs/{job_id}/checkpoints")]
    for response in bodies:
        assert response.status_code == 200, response.text
        assert home not in response.text and root not in response.text, response.text
    assert all(m["path"] is None for m in bodies[0].json()["items"])
    job = bodies[1].json()
    assert job["error"] == f"could not load {HIDDEN_PATH}: truncated"
    assert job["tuning"]["models"][0] == {"model": "m", "checkpoint_dir": HIDDEN_PATH, "metrics": {"accuracy": 0.5}}
    shown = {m["id"]: m["path"] for m in admin.get("/v1/models").json()["items"]}
    assert shown[model_id].startswith(root)


# ---- item 2: catalog poisoning ----------------------------------------------------------------------------------

def test_a_user_keys_catalog_entries_are_its_own(server: Server) -> None:
    admin, _ = server.key(ADMIN)
    a, _ = server.key()
    b, _ = server.key()
    repo = f"evil/bert-base-uncased-{uuid.uuid4().hex[:6]}"
    poisoned = b.post("/v1/models", json={"source": "hf", "repo_id": repo})
    assert poisoned.status_code == 201 and poisoned.json()["shared"] is False
    b_entry = poisoned.json()["id"]
    assert b_entry not in {m["id"] for m in a.get("/v1/models").json()["items"]}
    a_data = upload(a).json()["id"]
    shared = admin.post("/v1/models", json={"source": "hf", "repo_id": f"org/shared-{uuid.uuid4().hex[:6]}"})
    assert shared.status_code == 201 and shared.json()["shared"] is True
    a_job = a.post("/v1/jobs", json={"dataset_id": a_data})
    assert a_job.status_code == 202, a_job.text
    assert b_entry not in a_job.json()["candidates"] and shared.json()["id"] in a_job.json()["candidates"]
    unknown = problem(a.post("/v1/jobs", json={"dataset_id": a_data, "candidates": [b_entry]}), 422)
    assert unknown["field"] == "candidates[0]" and unknown["title"] == "unknown model"
    # the same repository added by A is A's own entry, not B's
    mine = a.post("/v1/models", json={"source": "hf", "repo_id": repo})
    assert mine.status_code == 201 and mine.json()["id"] != b_entry
    # removal: not another key's entry (404, as for none), not the shared catalog's (403), one's own (204)
    gone = problem(a.delete(f"/v1/models/{b_entry}"), 404)
    assert gone["title"] == problem(a.delete(f"/v1/models/{uuid.uuid4().hex}"), 404)["title"]
    assert problem(b.delete(f"/v1/models/{shared.json()['id']}"), 403)["title"]
    assert b.delete(f"/v1/models/{b_entry}").status_code == 204
    assert b_entry not in {m["id"] for m in b.get("/v1/models").json()["items"]}
    problem(b.delete(f"/v1/models/{b_entry}"), 404)
    again = b.post("/v1/models", json={"source": "hf", "repo_id": repo})  # registering it again brings it back
    assert again.status_code == 201 and again.json()["id"] == b_entry
    assert admin.delete(f"/v1/models/{shared.json()['id']}").status_code == 204  # admins remove any entry
    assert admin.delete(f"/v1/models/{b_entry}").status_code == 204
    b_data = upload(b).json()["id"]
    candidates = b.post("/v1/jobs", json={"dataset_id": b_data}).json().get("candidates") or []
    assert shared.json()["id"] not in candidates and b_entry not in candidates


def test_a_removed_candidate_is_not_run_by_a_queued_job(server: Server) -> None:
    from workers.runner import _load

    admin, _ = server.key(ADMIN)
    a, _ = server.key()
    kept = admin.post("/v1/models", json={"source": "hf", "repo_id": f"org/kept-{uuid.uuid4().hex[:6]}"}).json()
    dropped = admin.post("/v1/models", json={"source": "hf", "repo_id": f"org/drop-{uuid.uuid4().hex[:6]}"}).json()
    job = a.post("/v1/jobs", json={"dataset_id": upload(a).json()["id"], "candidates": [kept["id"], dropped["id"]]})
    assert job.status_code == 202, job.text
    assert admin.delete(f"/v1/models/{dropped['id']}").status_code == 204
    _, _, models = _load(server.sessions, job.json()["id"])
    assert [m.id for m in models] == [kept["id"]]


def test_hub_allow_list_at_registration(tmp_path: Path) -> None:
    server = make_server(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}",
                         hub_allow="sentence-transformers/*, google-bert/bert-base-uncased")
    admin, _ = server.key(ADMIN)
    user, _ = server.key()
    for client in (admin, user):
        refused = problem(client.post("/v1/models", json={"source": "hf", "repo_id": "evil/bert-base-uncased"}), 403)
        assert refused["field"] == "repo_id" and "HUBTUNE_HUB_ALLOW" in refused["detail"]
    assert admin.post("/v1/models", json={"source": "hf", "repo_id": "Sentence-Transformers/all-MiniLM-L6-v2"}
                      ).status_code == 201
    assert user.post("/v1/models", json={"source": "hf", "repo_id": "google-bert/bert-base-uncased"}).status_code == 201


# ---- item 3: keyless loopback mode ------------------------------------------------------------------------------

def test_keyless_mode_refuses_foreign_hosts_and_cross_site_posts(tmp_path: Path) -> None:
    """A page on evil.example drove the API: by DNS rebinding (Host: evil.example) and by a cross-site form post
    (Origin: http://evil.example -> 201). Now 421 and 403; the CLI, curl and the API's own origin pass."""
    server = make_server(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", auth="auto", model_roots="")
    local = server.client(base_url="http://127.0.0.1:8000")
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "10.0.0.1:8000", ""):
        body = problem(local.get("/v1/datasets", headers={"Host": host}), 421)
        assert body["field"] == "Host"
    problem(local.get("/healthz", headers={"Host": "evil.example"}), 421)
    for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "localhost"):
        assert local.get("/v1/datasets", headers={"Host": host}).status_code == 200, host
    form = {"files": {"file": ("d.csv", CSV)}, "data": {"task": "classification"}}
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": "http://localhost:3000"},
                    {"Origin": "http://127.0.0.1"}, {"Sec-Fetch-Site": "cross-site"}):
        assert problem(local.post("/v1/datasets", headers=headers, **form), 403)["field"] == "Origin"
    problem(local.delete(f"/v1/models/{uuid.uuid4().hex}", headers={"Origin": "http://evil.example"}), 403)
    assert local.get("/v1/datasets").json()["total"] == 0  # nothing the refused posts sent was stored
    for headers in ({}, {"Origin": "http://127.0.0.1:8000"}, {"Origin": "http://localhost:8000"}):
        assert local.post("/v1/datasets", headers=headers, **form).status_code == 201, headers
    assert local.get("/v1/datasets", headers={"Origin": "http://evil.example"}).status_code == 200  # reads pass


def test_with_keys_required_the_host_is_not_checked(server: Server) -> None:
    """Behind a reverse proxy the Host is the public name; a key, which no web page can attach, guards the API."""
    a, _ = server.key()
    assert a.get("/v1/datasets", headers={"Host": "hubtune.example.com"}).status_code == 200


# ---- per-key limits ---------------------------------------------------------------------------------------------

def test_rate_limit_per_key_is_429_with_retry_after(tmp_path: Path) -> None:
    server = make_server(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", key_rate_limit=3)
    a, _ = server.key()
    b, _ = server.key()
    # /v1/models reads the caller twice (router and route): one request is still counted once
    assert [a.get(path).status_code for path in ("/v1/models", "/v1/datasets", "/v1/models")] == [200, 200, 200]
    refused = a.get("/v1/datasets")
    body = problem(refused, 429)
    assert body["limit"] == "HUBTUNE_KEY_RATE_LIMIT" and body["limit_value"] == 3
    assert 1 <= int(refused.headers["retry-after"]) <= 20
    assert b.get("/v1/datasets").status_code == 200  # per key


def test_token_bucket_refills() -> None:
    from service.api.quotas import RateLimiter

    limiter = RateLimiter(60)  # one a second, bursts of 60
    assert all(limiter.wait_seconds("k", now=0.0) == 0 for _ in range(60))
    assert limiter.wait_seconds("k", now=0.0) == pytest.approx(1.0)
    assert limiter.wait_seconds("k", now=1.0) == 0
    assert limiter.wait_seconds("other", now=1.0) == 0
    assert RateLimiter(0).wait_seconds("k") == 0


def test_active_jobs_limit_is_429(server: Server, tmp_path: Path) -> None:
    limited = make_server(tmp_path, server.settings.sqlalchemy_url, key_max_active_jobs=2)
    admin, _ = limited.key(ADMIN)
    a, _ = limited.key()
    b, _ = limited.key()
    admin.post("/v1/models", json={"source": "hf", "repo_id": f"org/m-{uuid.uuid4().hex[:6]}"})
    dataset = upload(a).json()["id"]
    first, second = (a.post("/v1/jobs", json={"dataset_id": dataset}) for _ in range(2))
    assert first.status_code == second.status_code == 202
    refused = a.post("/v1/jobs", json={"dataset_id": dataset})
    body = problem(refused, 429)
    assert body["limit"] == "HUBTUNE_KEY_MAX_ACTIVE_JOBS" and body["limit_value"] == 2
    assert int(refused.headers["retry-after"]) > 0
    assert b.post("/v1/jobs", json={"dataset_id": upload(b).json()["id"]}).status_code == 202
    with limited.sessions.begin() as session:
        session.execute(update(Job).where(Job.id == first.json()["id"]).values(status="succeeded"))
    assert a.post("/v1/jobs", json={"dataset_id": dataset}).status_code == 202


def test_stored_bytes_limit_is_507_and_counts_checkpoints(tmp_path: Path) -> None:
    server = make_server(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", key_max_bytes=len(CSV) * 2 + 10)
    admin, _ = server.key(ADMIN)
    a, _ = server.key()
    assert upload(a).status_code == 201 and upload(a).status_code == 201
    stored = sorted(p.name for p in server.settings.datasets_dir.iterdir())
    body = problem(upload(a, CSV * 2), 507)
    assert body["limit"] == "HUBTUNE_KEY_MAX_BYTES" and body["limit_value"] == len(CSV) * 2 + 10
    assert sorted(p.name for p in server.settings.datasets_dir.iterdir()) == stored  # nothing left behind
    b, b_id = server.key()
    model_id = catalog_model(server, admin)
    tuned_checkpoint(server, b, b_id, model_id)  # its dataset and 1 KB of checkpoint files: past the limit
    dataset = b.get("/v1/datasets").json()["items"][0]["id"]
    assert problem(b.post("/v1/jobs", json={"dataset_id": dataset, "tune": {"epochs": 1}}), 507)["limit"] == \
        "HUBTUNE_KEY_MAX_BYTES"
    problem(upload(b), 507)
    assert b.post("/v1/jobs", json={"dataset_id": dataset}).status_code == 202  # ranking stores nothing


# ---- keys: roles, expiry, revocation, the CLI -------------------------------------------------------------------

def test_expired_and_revoked_keys_get_401(server: Server) -> None:
    a, a_id = server.key(expires_in=timedelta(days=30))
    assert a.get("/v1/datasets").status_code == 200
    with server.sessions.begin() as session:
        session.execute(update(ApiKey).where(ApiKey.id == a_id).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert "expired" in problem(a.get("/v1/datasets"), 401)["detail"]
    b, b_id = server.key()
    with server.sessions.begin() as session:
        session.execute(update(ApiKey).where(ApiKey.id == b_id).values(revoked_at=utcnow()))
    problem(b.get("/v1/datasets"), 401)


def test_keys_cli_create_list_revoke_set_role(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main
    from service.settings import get_settings

    monkeypatch.setenv("HUBTUNE_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    try:
        assert main(["keys", "create", "--name", "ops", "--admin", "--expires-in", "30d"]) == 0
        key = capsys.readouterr().out.strip()
        assert main(["keys", "create", "--name", "alice"]) == 0
        capsys.readouterr()
        assert main(["keys", "list"]) == 0
        listing = capsys.readouterr().out
        assert "ops" in listing and "admin" in listing and "alice" in listing and "user" in listing
        with pytest.raises(SystemExit, match="duration"):
            main(["keys", "create", "--expires-in", "soon"])
        server = make_server(tmp_path, get_settings().sqlalchemy_url)
        ops = server.client(key)
        assert register_local(ops, model_folder(server.roots / "m")).status_code == 201  # an admin
        assert main(["keys", "set-role", key[:8], "user"]) == 0
        problem(register_local(ops, model_folder(server.roots / "m2")), 403)
        assert main(["keys", "revoke", key[:8]]) == 0
        problem(ops.get("/v1/models"), 401)
        with pytest.raises(SystemExit, match="names 0 keys"):
            main(["keys", "revoke", "ht_nothing"])
    finally:
        get_settings.cache_clear()


# ---- migration 0005 ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", BOTH)
def test_migration_keeps_existing_keys_and_models(kind: str, tmp_path: Path) -> None:
    """A database at 0004 with a key, a model, a job ranked on it and a checkpoint: after the upgrade the key works
    (as a user key), the model is in the shared catalog, rankings and checkpoints still reference it."""
    from alembic import command
    from sqlalchemy import text

    from service.db import make_engine
    from service.migrate import alembic_config
    from service.security import hash_key

    with scratch_database(kind, tmp_path) as url:
        command.upgrade(alembic_config(url), "0004")
        engine = make_engine(url)
        with engine.begin() as c:
            c.execute(text("INSERT INTO api_keys (id, name, prefix, key_hash, created_at) "
                           "VALUES ('k1', 'old', 'ht_old', :h, CURRENT_TIMESTAMP)"), {"h": hash_key("ht_old_key")})
            c.execute(text("INSERT INTO models (id, name, source, locator, revision, modality, has_source_head, "
                           "created_at) VALUES ('m1', 'org/m', 'hf', 'org/m', 'main', 'text', false, "
                           "CURRENT_TIMESTAMP)"))
            c.execute(text("INSERT INTO datasets (id, owner, filename, format, task, modality, rows, sha256, "
                           "size_bytes, storage_path, created_at) VALUES ('d1', 'k1', 'f.csv', 'csv', "
                           "'classification', 'text', 2, '0', 1, '/nowhere', CURRENT_TIMESTAMP)"))
            c.execute(text("INSERT INTO jobs (id, owner, dataset_id, candidates, metrics, options, status, phase, "
                           "stage, progress, cancel_requested, attempts, created_at) VALUES ('j1', 'k1', 'd1', "
                           "'[\"m1\"]', '[\"logme\"]', '{}', 'succeeded', 'rank', 'done', 1, false, 0, "
                           "CURRENT_TIMESTAMP)"))
            c.execute(text("INSERT INTO rankings (job_id, model_id, rank, scores, details, feature_seconds) "
                           "VALUES ('j1', 'm1', 1, '{}', '{}', 0)"))
            c.execute(text("INSERT INTO checkpoints (job_id, name, model_id, path, files, created_at) "
                           "VALUES ('j1', 'c', 'm1', '/nowhere', '[]', CURRENT_TIMESTAMP)"))
        engine.dispose()
        server = make_server(tmp_path, url)  # create_app upgrades to head
        old = server.client("ht_old_key")
        models = old.get("/v1/models")
        assert models.status_code == 200, models.text
        assert [(m["id"], m["shared"]) for m in models.json()["items"]] == [("m1", True)]
        assert old.get("/v1/jobs/j1").json()["ranking"][0]["model_id"] == "m1"
        assert old.get("/v1/jobs/j1/checkpoints").json()[0]["model_id"] == "m1"
        problem(register_local(old, model_folder(server.roots / "m")), 403)  # existing keys are user keys
        with server.sessions() as session:
            assert session.get(ApiKey, "k1").role == USER
        # back to 0004, which would show a key's own entries to every key: refused while there are any
        mine = old.post("/v1/models", json={"source": "hf", "repo_id": "org/private"})
        assert mine.status_code == 201 and mine.json()["shared"] is False
        with pytest.raises(RuntimeError, match="belong to one key"):
            command.downgrade(alembic_config(url), "0004")
        with server.sessions.begin() as session:
            session.execute(text("DELETE FROM models WHERE owner <> ''"))
        command.downgrade(alembic_config(url), "0004")
        command.upgrade(alembic_config(url), "head")
        assert old.get("/v1/jobs/j1").json()["ranking"][0]["model_id"] == "m1"


# ---- hub repositories in the worker: allow-list and size cap ---------------------------------------------------

@pytest.fixture
def hub_policy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Sets HUBTUNE_HUB_* in the environment the worker reads its settings from."""
    from service.settings import get_settings

    def set_policy(**env: str) -> None:
        for name, value in env.items():
            monkeypatch.setenv(f"HUBTUNE_{name.upper()}", value)
        get_settings.cache_clear()

    yield set_policy
    get_settings.cache_clear()


def test_download_bytes_counts_what_would_be_fetched() -> None:
    from workers.hub import download_bytes

    files = [("config.json", 500), ("model.safetensors", 10_000), ("onnx/model.onnx", 99_999),
             ("pytorch_model.bin", 20_000), ("tokenizer.json", 1_000), ("README.md", 7)]
    assert download_bytes(files) == 11_500  # safetensors present: no .bin, nothing in subfolders
    assert download_bytes([f for f in files if f[0] != "model.safetensors"]) == 21_500
    assert download_bytes([("config.json", None)]) == 0


def test_worker_refuses_a_hub_repo_outside_the_allow_list_before_downloading(
        hub_policy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    from workers.hub import ModelResolutionError, resolve_model

    called: list[str] = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: called.append(repo_id))
    hub_policy(hub_allow="sentence-transformers/*")
    with pytest.raises(ModelResolutionError, match="HUBTUNE_HUB_ALLOW"):
        resolve_model("hf", repo_id="evil/bert-base-uncased")
    assert called == []


def test_worker_refuses_a_hub_repo_above_the_size_cap_from_its_metadata(
        hub_policy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub's file list (model_info with files_metadata) says how much would be downloaded; above
    HUBTUNE_HUB_MAX_BYTES nothing is."""
    from types import SimpleNamespace

    import huggingface_hub

    from workers.hub import ModelResolutionError, resolve_model

    called: list[str] = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: called.append(repo_id))
    siblings = [SimpleNamespace(rfilename="config.json", size=600), SimpleNamespace(rfilename="model.safetensors",
                                                                                    size=5_000_000_000)]
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, **kw: SimpleNamespace(
        siblings=siblings))
    hub_policy(hub_max_bytes="1000000")
    with pytest.raises(ModelResolutionError, match="5000000600 bytes.*HUBTUNE_HUB_MAX_BYTES is 1000000"):
        resolve_model("hf", repo_id="org/huge", revision="main")
    assert called == []


def test_worker_measures_a_cached_snapshot_against_the_size_cap_offline(
        hub_policy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    from tests.unit.test_hub import hub_cache
    from workers.hub import ModelResolutionError, resolve_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_cache(tmp_path, "org/tiny")  # 2 MiB of weights
    hub_policy(hub_max_bytes=str(1 << 20))
    with pytest.raises(ModelResolutionError, match="HUBTUNE_HUB_MAX_BYTES"):
        resolve_model("hf", repo_id="org/tiny", cache_dir=tmp_path)
    hub_policy(hub_max_bytes=str(4 << 20))
    assert resolve_model("hf", repo_id="org/tiny", cache_dir=tmp_path).path.is_dir()


def test_a_checkpoint_entry_resolves_to_its_folder(tmp_path: Path) -> None:
    from workers.hub import content_revision, resolve_model
    from workers.pipeline import ModelSpec

    folder = model_folder(tmp_path / "ckpt")
    resolved = ModelSpec("id", "job/ckpt", "checkpoint", str(folder), "").resolve(None)
    assert resolved.path == folder and resolved.revision == content_revision(folder)
    assert resolve_model("checkpoint", path=str(folder)) == resolved

"""Requests that got a 500, or were accepted and failed later in the worker, now get a 4xx problem+json naming the
field or row (issue 19, items 8, 10 and 11); 405 and 401 carry Allow and WWW-Authenticate; timestamps carry their
offset. The app runs in-process (TestClient), on SQLite and on PostgreSQL where the databases behaved differently.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from service.app import create_app
from service.db import Checkpoint, Job
from service.settings import Settings
from tests.unit.test_job_states import scratch_database

BOTH = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
CSV = b"text,label\nhello,a\nworld,b\n"
DEEP = "[" * 100_000 + "]" * 100_000  # RecursionError in json.loads


def make_client(home: Path, url: str, auth: str = "auto") -> TestClient:
    settings = Settings(home=home, database_url=url, auth=auth, bind_host="127.0.0.1")
    app = create_app(settings, send=lambda *a: None, run_reconciler=False)
    # a loopback Host: in keyless mode the API refuses any other (TestClient says "testserver" by default)
    return TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)


@pytest.fixture(scope="module", params=BOTH)
def client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One app per database for the module (keyless loopback mode); tests use fresh names, so they share it."""
    tmp = tmp_path_factory.mktemp(request.param)
    with scratch_database(request.param, tmp) as url, make_client(tmp / "home", url) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def sqlite_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """For what no database changes: uploads and their parsing."""
    tmp = tmp_path_factory.mktemp("sqlite-only")
    with make_client(tmp / "home", f"sqlite:///{tmp / 'hubtune.db'}") as test_client:
        yield test_client


def problem(response: httpx.Response, status: int, field: str | None = None, row: int | None = None) -> dict:
    """The problem+json body of `response`, checked to have this status, field and row."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["title"] and body["instance"]
    if field is not None:
        assert body.get("field") == field, body
    if row is not None:
        assert body.get("row") == row, body
    return body


def upload(client: TestClient, content: bytes, name: str = "d.csv", **form: str) -> httpx.Response:
    return client.post("/v1/datasets", files={"file": (name, content)}, data={"task": "classification", **form})


def raw_json(client: TestClient, path: str, text: str) -> httpx.Response:
    """POST `text` as the JSON body, as sent: escapes such as \\ud800 reach the server unchanged."""
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"})


def register(client: TestClient) -> str:
    response = client.post("/v1/models", json={"source": "hf", "repo_id": f"org/m-{uuid.uuid4().hex[:8]}"})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def make_job(client: TestClient) -> str:
    dataset = upload(client, CSV)
    assert dataset.status_code == 201, dataset.text
    job = client.post("/v1/jobs", json={"dataset_id": dataset.json()["id"], "candidates": [register(client)]})
    assert job.status_code == 202, job.text
    return job.json()["id"]


# ---- item 8: limits of list endpoints, ids, strings --------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/datasets", "/v1/jobs", "/v1/models"])
@pytest.mark.parametrize("param", ["offset", "limit"])
def test_a_huge_offset_or_limit_is_a_422_naming_it(client: TestClient, path: str, param: str) -> None:
    body = problem(client.get(f"{path}?{param}={2**63}"), 422, field=param)
    assert "less than or equal" in body["detail"]
    assert client.get(f"{path}?offset={2**31 - 1}").status_code == 200  # the bound itself is a page (empty)


@pytest.mark.parametrize(("method", "path", "field"), [
    ("GET", "/v1/datasets/ab%00cd", "dataset_id"),
    ("GET", "/v1/jobs/ab%00cd", "job_id"),
    ("POST", "/v1/jobs/ab%00cd/cancel", "job_id"),
    ("GET", "/v1/jobs/ab%00cd/checkpoints", "job_id"),
    ("GET", "/v1/jobs/abcd/checkpoints/n%00ame/files/config.json", "name"),
])
def test_a_nul_in_a_path_id_is_a_422_naming_it(client: TestClient, method: str, path: str, field: str) -> None:
    assert "NUL" in problem(client.request(method, path), 422, field=field)["detail"]


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/models", {"source": "hf", "repo_id": "org/x", "name": "a\x00b"}, "name"),
    ("/v1/models", {"source": "hf", "repo_id": "org/x", "revision": "v1\x00"}, "revision"),
    ("/v1/models", {"source": "hf", "repo_id": "org/\x00x"}, "repo_id"),
    ("/v1/models", {"source": "local", "path": "/tmp/\x00"}, "path"),
    ("/v1/jobs", {"dataset_id": "d\x00"}, "dataset_id"),
    ("/v1/jobs", {"dataset_id": "d", "candidates": ["m", "m\x00"]}, "candidates"),
    ("/v1/jobs", {"dataset_id": "d", "tune": {"target": "m\x00"}}, "tune.target"),
    ("/v1/jobs", {"dataset_id": "d", "tune": {"regularizer": {"name": "l2sp", "params": {"alpha": "\x00"}}}},
     "tune.regularizer.params"),
])
def test_a_nul_in_a_body_string_is_a_422_naming_the_field(client: TestClient, path: str, body: dict[str, Any],
                                                          field: str) -> None:
    assert "NUL" in problem(client.post(path, json=body), 422, field=field)["detail"]


@pytest.mark.parametrize(("path", "text", "field"), [
    ("/v1/models", '{"source": "hf", "repo_id": "org/x", "name": "\\ud800"}', "name"),
    ("/v1/jobs", '{"dataset_id": "d", "candidates": ["\\udfff"]}', "candidates[0]"),
    ("/v1/jobs", '{"dataset_id": "d", "tune": {"regularizer": {"name": "l2sp", "params": {"\\ud800": 1}}}}',
     "tune.regularizer.params"),
])
def test_a_lone_surrogate_in_a_body_is_a_422(client: TestClient, path: str, text: str, field: str) -> None:
    """pydantic refuses one in a str field; RequestModel in free-form values and keys."""
    problem(raw_json(client, path, text), 422, field=field)


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/models", {"source": "hf", "repo_id": "org/x", "name": "n" * 301}, "name"),  # String(300)
    ("/v1/models", {"source": "hf", "repo_id": "org/x", "revision": "r" * 101}, "revision"),  # String(100)
    ("/v1/models", {"source": "hf", "repo_id": "org/" + "x" * 93}, "repo_id"),  # the hub's 96
    ("/v1/jobs", {"dataset_id": "d" * 33}, "dataset_id"),  # String(32)
    ("/v1/jobs", {"dataset_id": "d", "candidates": ["m" * 33]}, "candidates[0]"),
    ("/v1/jobs", {"dataset_id": "d", "tune": {"target": "m" * 33}}, "tune.target"),
])
def test_an_overlong_body_string_is_a_422_naming_the_field(client: TestClient, path: str, body: dict[str, Any],
                                                           field: str) -> None:
    assert "at most" in problem(client.post(path, json=body), 422, field=field)["detail"]


@pytest.mark.parametrize(("form", "field", "why"), [
    ({"text_column": "t" * 201}, "text_column", "at most"),  # String(200)
    ({"label_column": "lab\x00el"}, "label_column", "NUL"),
    ({"text_pair_column": "p\x00"}, "text_pair_column", "NUL"),
])
def test_a_bad_column_form_field_is_a_422_naming_it(client: TestClient, form: dict[str, str], field: str,
                                                    why: str) -> None:
    """The file has the column, so only the form field's own check stops it (PostgreSQL refused the row)."""
    columns = {"text_column": "text", "label_column": "label", **form}  # form field -> header name
    rows = [list(columns.values())] + [[label if kind == "label_column" else "some text" for kind in columns]
                                       for label in ("x", "y")]
    content = "\n".join(",".join(row) for row in rows).encode()
    assert why in problem(upload(client, content, **form), 422, field=field)["detail"]


def test_an_overlong_file_name_is_a_422(client: TestClient) -> None:
    assert "at most 500" in problem(upload(client, CSV, name="d" * 497 + ".csv"), 422, field="file")["detail"]


def test_a_nul_in_the_uploaded_file_name_is_a_422(client: TestClient) -> None:
    """httpx escapes a NUL in a file name; a raw multipart body does not."""
    body = (b'--XyZ\r\nContent-Disposition: form-data; name="task"\r\n\r\nclassification\r\n'
            b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="d\x00.csv"\r\n\r\n' + CSV +
            b"\r\n--XyZ--\r\n")
    response = client.post("/v1/datasets", content=body,
                           headers={"content-type": "multipart/form-data; boundary=XyZ"})
    assert "NUL" in problem(response, 422, field="file")["detail"]


@pytest.mark.parametrize("config", [{"model_type": "t" * 101}, {"architectures": ["A\x00ForMaskedLM"]}])
def test_a_local_config_the_catalog_cannot_record_is_a_422(client: TestClient, tmp_path: Path,
                                                            config: dict[str, Any]) -> None:
    """model_type and architecture come from the folder's config.json into String(100) and String(200)."""
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 10, **config}))
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    problem(client.post("/v1/models", json={"source": "local", "path": str(tmp_path)}), 422, field="path")


# ---- item 8: uploads whose parsing raised ---------------------------------------------------------------------
@pytest.mark.parametrize(("name", "content", "task", "field", "row"), [
    ("d.jsonl", f'{{"text": "a", "label": "x"}}\n{{"text": "b", "label": {DEEP}}}\n', "classification", "file", 2),
    ("d.json", f'[{{"text": "a", "label": {DEEP}}}]', "classification", "file", None),
    ("d.csv", f'text,label\na,"{DEEP}"\nb,y\n', "multilabel", "label_column", 1),
])
def test_json_nested_too_deeply_is_a_422(sqlite_client: TestClient, name: str, content: str, task: str,
                                         field: str, row: int | None) -> None:
    body = problem(upload(sqlite_client, content.encode(), name=name, task=task), 422, field=field, row=row)
    assert "nested too deeply" in body["detail"]


@pytest.mark.parametrize(("name", "content", "task", "field", "row"), [
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b\\ud800", "label": "y"}\n', "classification", "file", 2),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "\\udc00"}\n', "classification", "file", 2),
    ("d.json", '[{"text": "a", "label": "x"}, {"text": "\\ud800", "label": "y"}]', "classification", "file", 2),
    ("d.csv", 'text,label\na,"[""\\ud800""]"\nb,y\n', "multilabel", "label_column", 1),
])
def test_a_lone_surrogate_in_an_upload_is_a_422_naming_the_row(sqlite_client: TestClient, name: str, content: str,
                                                               task: str, field: str, row: int) -> None:
    body = problem(upload(sqlite_client, content.encode(), name=name, task=task), 422, field=field, row=row)
    assert "surrogate" in body["detail"]


@pytest.mark.parametrize(("name", "content"), [
    ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": ' + "1" * 400 + "}\n"),  # OverflowError
    ("d.csv", "text,label\na,1\nb," + "9" * 400 + "\n"),  # float() gives inf for the string
    ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 1e308}\n'),  # accepted, the job failed later
    ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": -1e308}\n'),
    ("d.csv", "text,label\na,0.5\nb,-1e15\n"),
])
def test_a_regression_label_too_large_is_a_422_naming_the_row_and_bound(sqlite_client: TestClient, name: str,
                                                                        content: str) -> None:
    response = upload(sqlite_client, content.encode(), name=name, task="regression")
    body = problem(response, 422, field="label_column", row=2)
    assert "1e+15" in body["detail"]


def test_regression_labels_below_the_bound_are_accepted(sqlite_client: TestClient) -> None:
    response = upload(sqlite_client, b"text,label\na,-9.9e14\nb,9.9e14\n", task="regression")
    assert response.status_code == 201, response.text


# ---- item 8: a checkpoint file listed but gone -------------------------------------------------------------------
def test_a_listed_checkpoint_file_missing_on_disk_is_a_404(client: TestClient, tmp_path: Path) -> None:
    job_id = make_job(client)
    (tmp_path / "config.json").write_text("{}")
    files = [{"path": name, "size": 2, "sha256": "0" * 64} for name in ("config.json", "model.safetensors")]
    with client.app.state.sessions.begin() as session:
        model_id = session.get(Job, job_id).candidates[0]
        session.add(Checkpoint(job_id=job_id, name="top1", model_id=model_id, path=str(tmp_path), files=files))
    base = f"/v1/jobs/{job_id}/checkpoints/top1/files"
    assert client.get(f"{base}/config.json").status_code == 200
    body = problem(client.get(f"{base}/model.safetensors"), 404, field="file_path")
    assert "model.safetensors" in body["detail"]


# ---- item 10: what the worker would have refused ----------------------------------------------------------------
@pytest.mark.parametrize("seed", [-1, 2**31])
def test_a_seed_out_of_range_is_a_422(client: TestClient, seed: int) -> None:
    problem(client.post("/v1/jobs", json={"dataset_id": "d", "seed": seed}), 422, field="seed")


@pytest.mark.parametrize("body", [
    {"source": "hf"}, {"source": "hf", "repo_id": ""}, {"source": "hf", "repo_id": "   "},
    {"source": "local", "path": " "},
])
def test_a_missing_or_blank_locator_is_a_422(client: TestClient, body: dict[str, str]) -> None:
    problem(client.post("/v1/models", json=body), 422, field="repo_id" if body["source"] == "hf" else "path")


@pytest.mark.parametrize("repo_id", ["org/na--me", "a/b/c", "-org/x", "org/x.", "org/x.git", " org/x", "org x"])
def test_a_repo_id_the_hub_refuses_is_a_422(client: TestClient, repo_id: str) -> None:
    problem(client.post("/v1/models", json={"source": "hf", "repo_id": repo_id}), 422, field="repo_id")


# ---- item 11: headers, timestamps --------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "allow"), [
    ("DELETE", "/v1/datasets", "GET, POST"),
    ("PUT", "/v1/jobs/abc", "GET"),
    ("GET", "/v1/jobs/abc/cancel", "POST"),
    ("PATCH", "/v1/models", "GET, POST"),
])
def test_a_405_names_the_allowed_methods(sqlite_client: TestClient, method: str, path: str, allow: str) -> None:
    response = sqlite_client.request(method, path)
    problem(response, 405)
    assert response.headers["allow"] == allow


def test_a_401_asks_for_a_bearer_token(tmp_path: Path) -> None:
    with make_client(tmp_path / "home", f"sqlite:///{tmp_path / 'hubtune.db'}", auth="required") as keyed:
        missing = keyed.get("/v1/datasets")
        wrong = keyed.get("/v1/models", headers={"Authorization": "Bearer not-a-key"})
    problem(missing, 401)
    assert missing.headers["www-authenticate"] == "Bearer"
    problem(wrong, 401)
    assert wrong.headers["www-authenticate"] == 'Bearer error="invalid_token"'


def has_utc_offset(stamp: str) -> bool:
    return datetime.fromisoformat(stamp).utcoffset() == timedelta(0)


def test_every_timestamp_carries_its_offset(client: TestClient) -> None:
    job_id = make_job(client)
    now = datetime.now(UTC)
    with client.app.state.sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(started_at=now, finished_at=now))
    job = client.get(f"/v1/jobs/{job_id}").json()
    stamps = [job["created_at"], job["started_at"], job["finished_at"],
              client.get("/v1/jobs").json()["items"][0]["started_at"],
              client.get(f"/v1/datasets/{job['dataset_id']}").json()["created_at"],
              client.get("/v1/datasets").json()["items"][0]["created_at"],
              client.get("/v1/models").json()["items"][0]["created_at"]]
    assert all(has_utc_offset(s) for s in stamps), stamps
    assert datetime.fromisoformat(job["started_at"]) == now

"""The whole stack with its artifacts in S3-compatible storage (moto's server, started here): upload a dataset, rank,
rank and tune, download a checkpoint file whole and by Range with its sha256, register the checkpoint as a model;
nothing but the SQLite database and the broker folder is written under HUBTUNE_HOME (nothing at all with
PostgreSQL and Redis)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.artifacts import DiskCache, S3Store
from tests.integration.conftest import Stack, _make_stack, postgres_available
from tests.integration.test_http_flow import register_hub, topic_csv, upload, wait_for
from tests.s3_server import S3Server, s3_server


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    with s3_server(tmp_path) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgres"])
def s3_stack(request: pytest.FixtureRequest, s3: S3Server, tmp_path: Path) -> Iterator[tuple[Stack, S3Store]]:
    if request.param == "postgres" and not postgres_available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL/Redis on 127.0.0.1 are required in CI")
        pytest.skip("PostgreSQL/Redis not reachable on 127.0.0.1")
    url = s3.bucket_url()
    cache = tmp_path / "worker-cache"
    for stack in _make_stack(request.param, tmp_path, HUBTUNE_ARTIFACTS_URL=url, HUBTUNE_CACHE_DIR=str(cache),
                             **s3.env):
        os.environ.update(s3.env)  # this process reads the bucket too, to look at what the stack stored
        try:
            yield stack, S3Store(url, DiskCache(tmp_path / "test-cache", 0))
        finally:
            for name in s3.env:
                os.environ.pop(name, None)


def written_under_home(home: Path) -> list[str]:
    """Every file under HOME but the test's own process logs."""
    return sorted(p.relative_to(home).as_posix() for p in home.rglob("*")
                  if p.is_file() and not (p.parent == home and p.suffix == ".log"))


@pytest.mark.slow  # a rank job and a tune job on the full stack: about 30 s on two busy cores
def test_rank_tune_and_download_with_object_storage(s3_stack: tuple[Stack, S3Store],
                                                    tiny_hub: dict[str, Path]) -> None:
    stack, store = s3_stack
    key = stack.create_key("s3")
    client = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    dataset = upload(client, topic_csv(120)).json()
    assert store.list(f"datasets/{dataset['id']}") == [f"datasets/{dataset['id']}/data.parquet"], dataset
    ids = register_hub(client, tiny_hub)
    stack.start_worker()

    ranked = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "candidates": ids[:2]}).json()
    ranked = wait_for(client, ranked["id"], stack, timeout=240)
    assert ranked["status"] == "succeeded", (ranked, stack.log_text())
    features = [k for k in store.list("features") if k.endswith("/MANIFEST")]
    assert len(features) == 2, store.list("features")  # one whole entry per candidate

    tune = {"strategy": "finetune", "top_k": 1, "epochs": 1, "lr": 1e-3, "batch_size": 16, "max_length": 32}
    tuned = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "candidates": ids[:2], "tune": tune}).json()
    tuned = wait_for(client, tuned["id"], stack, timeout=300)
    assert tuned["status"] == "succeeded", (tuned, stack.log_text())
    assert [r["scores"] for r in tuned["ranking"]] == [r["scores"] for r in ranked["ranking"]]  # cached features
    assert len([k for k in store.list("features") if k.endswith("/MANIFEST")]) == 2

    [checkpoint] = client.get(f"/v1/jobs/{tuned['id']}/checkpoints").json()
    prefix = f"jobs/{tuned['id']}/checkpoints/{checkpoint['name']}"
    assert store.folder_complete(prefix)
    assert sorted(store.list(prefix)) == sorted([f"{prefix}/{f['path']}" for f in checkpoint["files"]]
                                                + [f"{prefix}/MANIFEST"])
    url = f"/v1/jobs/{tuned['id']}/checkpoints/{checkpoint['name']}/files/"
    weights = next(f for f in checkpoint["files"] if f["path"] == "model.safetensors")
    whole = client.get(url + "model.safetensors")
    assert whole.status_code == 200 and whole.headers["x-checksum-sha256"] == weights["sha256"]
    assert hashlib.sha256(whole.content).hexdigest() == weights["sha256"] and len(whole.content) == weights["size"]
    middle = client.get(url + "model.safetensors", headers={"Range": "bytes=100-1123"})
    assert middle.status_code == 206 and middle.content == whole.content[100:1124]
    assert middle.headers["content-range"] == f"bytes 100-1123/{weights['size']}"
    tail = client.get(url + "model.safetensors", headers={"Range": "bytes=-16"})
    assert tail.status_code == 206 and tail.content == whole.content[-16:]
    beyond = client.get(url + "model.safetensors", headers={"Range": f"bytes={weights['size']}-"})
    assert beyond.status_code == 416 and beyond.headers["content-type"] == "application/problem+json"
    assert client.get(url + "../../MANIFEST").status_code == 404  # only the files the checkpoint lists

    registered = client.post("/v1/models", json={"source": "checkpoint", "job_id": tuned["id"],
                                                 "name": checkpoint["name"]})
    assert registered.status_code == 201, registered.text

    store.client.delete_object(Bucket=store.bucket, Key=store.base + f"{prefix}/README.md")  # a lost object
    gone = client.get(url + "README.md")
    assert gone.status_code == 404 and gone.json()["title"] == "file missing", gone.text

    stored = written_under_home(stack.home)
    if stack.kind == "sqlite":  # the database file and the filesystem broker's messages, nothing else
        assert stored and all(p.startswith(("broker/", "hubtune.db")) for p in stored), stored
    else:  # PostgreSQL and Redis: no file at all
        assert stored == [], stored


@pytest.mark.slow  # two workers, a rank job and a tune job: about 60 s on two busy cores
def test_two_machines_share_one_job_through_object_storage(s3: S3Server, tmp_path: Path,
                                                            tiny_hub: dict[str, Path]) -> None:
    """Worker B runs as on another machine: its own HUBTUNE_HOME and cache, nothing shared with the API's machine
    but PostgreSQL, Redis and the bucket. Both score candidates of one rank job and train targets of one tune
    job; every feature entry and checkpoint the coordinator reads back comes from the bucket."""
    from tests.integration.faults import _descendants
    from tests.integration.test_fanout import _pid, _wait_until_ready
    from tests.tiny_models import make_tiny_bert

    if not postgres_available():
        pytest.skip("PostgreSQL/Redis not reachable on 127.0.0.1")
    url = s3.bucket_url()
    for stack in _make_stack("postgres", tmp_path, HUBTUNE_ARTIFACTS_URL=url,
                             HUBTUNE_CACHE_DIR=str(tmp_path / "a-cache"), **s3.env):
        key = stack.create_key("s3")
        client = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        hub = dict(tiny_hub, **{f"bert-{w}": make_tiny_bert(tmp_path / f"bert-{w}", hidden_size=w, num_layers=2,
                                                            seed=w) for w in (48, 96)})
        ids = register_hub(client, hub)
        dataset = upload(client, topic_csv(300, words=30)).json()
        machine_b = tmp_path / "machine-b"
        b_env = dict(stack.env, HUBTUNE_HOME=str(machine_b / "home"), HUBTUNE_CACHE_DIR=str(machine_b / "cache"))
        a = stack.start_worker()
        stack.env, a_env = b_env, stack.env
        b = stack.start_worker()
        stack.env = a_env
        _wait_until_ready(stack, [a, b])

        tune = {"strategy": "finetune", "top_k": 2, "epochs": 1, "lr": 1e-3, "batch_size": 16, "max_length": 32}
        job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "candidates": ids, "tune": tune}).json()
        job = wait_for(client, job["id"], stack, timeout=300)
        assert job["status"] == "succeeded", (job, stack.log_text())
        b_pids = set(_descendants(b.pid))
        assert {_pid(r["worker"]) in b_pids for r in job["ranking"]} == {True, False}  # both scored
        assert {_pid(t["worker"]) in b_pids for t in job["tuning"]["models"]} == {True, False}  # both trained
        os.environ.update(s3.env)  # this process reads the bucket too
        try:
            store = S3Store(url, DiskCache(tmp_path / "test-cache", 0))
            checkpoints = client.get(f"/v1/jobs/{job['id']}/checkpoints").json()
            assert all(store.folder_complete(f"jobs/{job['id']}/checkpoints/{c['name']}") for c in checkpoints)
        finally:
            for name in s3.env:
                os.environ.pop(name, None)
        for checkpoint in checkpoints:
            body = client.get(f"/v1/jobs/{job['id']}/checkpoints/{checkpoint['name']}/files/config.json")
            config = next(f for f in checkpoint["files"] if f["path"] == "config.json")
            assert hashlib.sha256(body.content).hexdigest() == config["sha256"]
        assert written_under_home(machine_b / "home") == []  # B kept nothing but its cache
        assert any((machine_b / "cache").rglob("*"))

"""The artifact stores (service/artifacts.py): the same tests against the local folder and against a real S3 server
(moto's server mode, started here): atomic writes, byte ranges, listing, folders visible only when whole, and the
workers' local cache with its size cap."""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.api.problems import Problem
from service.api.routes.checkpoints import parse_range
from service.artifacts import (
    PART,
    ArtifactStore,
    ArtifactStoreUnavailable,
    DiskCache,
    LocalStore,
    S3Store,
    checked_key,
)
from tests.s3_server import S3Server, s3_server


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "artifacts")
    server: S3Server = request.getfixturevalue("s3")
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    remote = S3Store(server.bucket_url(), DiskCache(tmp_path / "cache", 0))
    remote.ensure_bucket()
    return remote


class Broken(io.RawIOBase):
    """A stream that fails after `good` bytes: a writer dying mid-upload."""

    def __init__(self, good: int) -> None:
        self.left = good

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        if self.left <= 0:
            raise ConnectionResetError("the client went away")
        n = min(len(buffer), self.left)
        buffer[:n] = b"x" * n
        self.left -= n
        return n


def test_put_read_ranges_list_delete(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    data = bytes(range(256)) * 40
    source.write_bytes(data)
    assert store.put_file("datasets/d1/data.parquet", source) == len(data)
    assert store.put_stream("jobs/j1/checkpoints/c/model.bin", io.BytesIO(b"weights")) == 7
    assert store.size("datasets/d1/data.parquet") == len(data) and store.exists("jobs/j1/checkpoints/c/model.bin")
    assert store.size("datasets/nope") is None and not store.exists("datasets/nope")
    assert b"".join(store.open_range("datasets/d1/data.parquet")) == data
    assert b"".join(store.open_range("datasets/d1/data.parquet", 100, 199)) == data[100:200]
    assert b"".join(store.open_range("datasets/d1/data.parquet", len(data) - 5)) == data[-5:]
    assert store.list() == ["datasets/d1/data.parquet", "jobs/j1/checkpoints/c/model.bin"]
    assert store.list("jobs/j1") == ["jobs/j1/checkpoints/c/model.bin"]
    assert store.list("jobs/j") == [] and store.list("missing/") == []  # a prefix is a folder, not a string start
    local = store.local_file("datasets/d1/data.parquet")
    assert local.read_bytes() == data
    assert store.key_of(store.location("datasets/d1/data.parquet")) == "datasets/d1/data.parquet"
    assert store.delete_prefix("datasets/d1") == 1
    assert store.list() == ["jobs/j1/checkpoints/c/model.bin"]
    with pytest.raises(FileNotFoundError):
        store.local_file("datasets/d2/data.parquet")


def test_a_failed_stream_leaves_nothing(store: ArtifactStore) -> None:
    """More than one part (multipart on S3), then the writer fails: no object, nothing listed, nothing to read."""
    with pytest.raises(ConnectionResetError):
        store.put_stream("datasets/d1/data.parquet", io.BufferedReader(Broken(PART + 1024)))
    assert store.list() == [] and not store.exists("datasets/d1/data.parquet")


def test_rewriting_a_key_replaces_it_whole(store: ArtifactStore) -> None:
    store.put_stream("features/k/meta.json", io.BytesIO(b"old"))
    with pytest.raises(ConnectionResetError):
        store.put_stream("features/k/meta.json", io.BufferedReader(Broken(10)))
    assert b"".join(store.open_range("features/k/meta.json")) == b"old"


def test_a_folder_is_visible_only_whole(store: ArtifactStore, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "weights.bin").write_bytes(b"w" * 1000)
    assert not store.folder_complete("jobs/j1/checkpoints/c")
    store.put_folder("jobs/j1/checkpoints/c", folder)
    assert store.folder_complete("jobs/j1/checkpoints/c")
    local = store.local_folder("jobs/j1/checkpoints/c")
    assert (local / "sub" / "weights.bin").read_bytes() == b"w" * 1000 and (local / "config.json").read_text() == "{}"
    assert store.size("jobs/j1/checkpoints/c/sub/weights.bin") == 1000
    with pytest.raises(FileNotFoundError):
        store.local_folder("jobs/j1/checkpoints/other")


def test_s3_a_crashed_multipart_upload_is_not_listed(store: ArtifactStore) -> None:
    """A worker killed between parts leaves an upload that was never completed: S3 lists and serves nothing."""
    if not isinstance(store, S3Store):
        pytest.skip("S3's multipart upload")
    name = store.base + "jobs/j1/checkpoints/c/model.safetensors"
    upload = store.client.create_multipart_upload(Bucket=store.bucket, Key=name)
    store.client.upload_part(Bucket=store.bucket, Key=name, UploadId=upload["UploadId"], PartNumber=1,
                             Body=b"p" * PART)
    assert store.list() == [] and not store.exists("jobs/j1/checkpoints/c/model.safetensors")
    with pytest.raises(FileNotFoundError):
        store.local_file("jobs/j1/checkpoints/c/model.safetensors")


def test_s3_a_folder_without_its_manifest_is_absent(store: ArtifactStore) -> None:
    """A worker killed after some of a checkpoint's files (before the manifest, written last): not complete."""
    if not isinstance(store, S3Store):
        pytest.skip("the local store renames a whole folder into place")
    store.put_stream("jobs/j1/checkpoints/c/config.json", io.BytesIO(b"{}"))
    assert not store.folder_complete("jobs/j1/checkpoints/c")
    with pytest.raises(FileNotFoundError):
        store.local_folder("jobs/j1/checkpoints/c")


def test_local_leftovers_of_a_killed_writer_are_not_listed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    (tmp_path / "datasets" / "d1").mkdir(parents=True)
    (tmp_path / "datasets" / "d1" / ".data.parquet.0123.tmp").write_bytes(b"half")
    (tmp_path / "features" / ".k.0123.tmp").mkdir(parents=True)
    (tmp_path / "features" / ".k.0123.tmp" / "features.npy").write_bytes(b"half")
    assert store.list() == [] and not store.exists("datasets/d1/data.parquet")


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", ".tmp/x", "a//b", "", "a/./b"])
def test_keys_cannot_leave_the_store(key: str) -> None:
    with pytest.raises(ValueError):
        checked_key(key)


def test_the_cache_evicts_least_recently_used_entries(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=2500)

    def filler(size: int):
        return lambda folder: (folder / "blob").write_bytes(b"b" * size)

    first = cache.get("a", filler(1000))
    second = cache.get("b", filler(1000))
    os.utime(first, (1, 1))
    os.utime(second, (2, 2))
    assert cache.get("a", filler(0)) == first and (first / "blob").stat().st_size == 1000  # a hit: not refilled
    cache.get("c", filler(1000))  # 3000 > 2500: the least recently used (b) goes
    assert first.is_dir() and not second.exists() and cache.entry("c").is_dir()


@pytest.mark.parametrize(("header", "wanted"), [
    (None, None), ("bytes=0-9", (0, 9)), ("bytes=90-", (90, 99)), ("bytes=-10", (90, 99)), ("bytes=-500", (0, 99)),
    ("bytes=50-5000", (50, 99)), ("bytes=0-1,5-6", None), ("items=0-1", None), ("bytes=x-y", None),
    ("bytes=-", None), ("bytes=9-3", None)])
def test_range_headers(header: str | None, wanted: tuple[int, int] | None) -> None:
    assert parse_range(header, 100) == wanted


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200"])
def test_ranges_past_the_end_are_416(header: str) -> None:
    with pytest.raises(Problem) as caught:
        parse_range(header, 100)
    assert caught.value.status == 416 and caught.value.headers == {"Content-Range": "bytes */100"}


def test_a_store_that_is_down_is_a_503(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens at the endpoint: the store raises ArtifactStoreUnavailable within seconds, and an upload is
    a 503 problem naming the dependency, with nothing left in the scratch folder."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings
    from tests.integration.test_http_flow import topic_csv
    from tests.s3_server import _free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    credentials = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)
    url = f"s3://down-{uuid.uuid4().hex[:8]}/p"
    started = time.monotonic()
    with pytest.raises(ArtifactStoreUnavailable):
        S3Store(url, DiskCache(tmp_path / "c", 0), timeout_seconds=1).size("datasets/d/data.parquet")
    assert time.monotonic() - started < 15
    settings = Settings(home=tmp_path / "home", artifacts_url=url, cache_dir=tmp_path / "cache")
    app = create_app(settings, send=lambda *a, **k: None, run_reconciler=False)  # starts; the store may come later
    with TestClient(app, base_url="http://127.0.0.1") as client:
        response = client.post("/v1/datasets", files={"file": ("d.csv", topic_csv(30))},
                               data={"task": "classification"})
    assert response.status_code == 503, response.text
    assert response.json()["dependency"] == "artifacts" and response.headers["retry-after"]
    scratch = tmp_path / "cache" / "uploads"
    assert not any(p.is_file() for p in scratch.rglob("*")) if scratch.exists() else True
    assert not (tmp_path / "home" / "artifacts").exists()

"""Uploads that exhausted the server (issue 19, items 4-7) are refused within bounded time and memory: request
bodies are held to their cap while they arrive, zip members are inflated in chunks under byte bounds, images are
counted by their headers before they are decoded, CSV headers and Parquet files are checked in linear time and on
their metadata, errors name the limit broken, and scratch left by a killed API is swept away.

Each test generates its hostile payload (tests/hostile_uploads.py) and asserts the answer AND what this process
spent on it: wall time, CPU time and peak RSS growth (reset through /proc/self/clear_refs). Uploads behave alike on
both databases (the row is written only after parsing), so the app runs on SQLite; the server-process tests are
tests/integration/test_upload_limits.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service import datasets as dataset_files
from service import tabular
from service.api.limits import BodyLimit
from service.app import create_app
from service.datasets import DatasetProblem, UploadLimits, parse_dataset
from service.settings import Settings
from tests import hostile_uploads as hostile

MIB = hostile.MIB
REPO = Path(__file__).resolve().parents[2]


def make_app(home: Path, **settings: Any) -> FastAPI:
    config = Settings(home=home, database_url=f"sqlite:///{home / 'hubtune.db'}", auth="auto",
                      bind_host="127.0.0.1", **settings)
    return create_app(config, send=lambda *a: None, run_reconciler=False)


def rejected(path: Path, fmt: str, limits: UploadLimits | None = None, **kwargs: Any) -> DatasetProblem:
    with pytest.raises(DatasetProblem) as info:
        parse_dataset(path, fmt, "classification", "text", "label", limits=limits, **kwargs)
    return info.value


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


# ---- item 4: the body cap, enforced while the body is read ------------------------------------------------------
def asgi_post(app: Any, path: str, headers: dict[str, str], body: Iterable[bytes]) -> tuple[int, dict, bytes, int]:
    """Drive the app as a server would: POST `path` with the body's chunks handed out one receive() at a time.
    Returns (status, headers, body, bytes of the request body the app pulled)."""
    chunks = iter(body)
    pulled = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal pulled
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in {"host": "127.0.0.1:8000", **headers}.items()],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, content, pulled


def endless(first: bytes, chunk: int = 64 * 1024) -> Iterator[bytes]:
    yield first
    block = b"x" * chunk
    while True:
        yield block


MULTIPART = {"content-type": f"multipart/form-data; boundary={hostile.MULTIPART_BOUNDARY}"}


@pytest.fixture
def capped_app(tmp_path: Path) -> FastAPI:
    return make_app(tmp_path / "home", max_upload_bytes=MIB, max_request_bytes=64 * 1024)


def test_a_declared_length_over_the_cap_is_413_before_the_body_is_read(capped_app: FastAPI) -> None:
    with hostile.spent() as used:
        status, headers, body, pulled = asgi_post(capped_app, "/v1/datasets",
                                                  {**MULTIPART, "content-length": str(10 * 1024 ** 3)},
                                                  endless(hostile.multipart_head()))
    assert (status, pulled) == (413, 0)
    assert headers["content-type"] == "application/problem+json" and headers["connection"] == "close"
    problem = json.loads(body)
    assert (problem["limit"], problem["limit_value"], problem["field"]) == ("HUBTUNE_MAX_UPLOAD_BYTES",
                                                                             MIB + 1024 * 1024, "file")
    assert "declares 10737418240 bytes" in problem["detail"]
    assert used.seconds < 1 and used.peak_rss_growth < 16 * MIB


def test_a_chunked_body_is_cut_off_as_soon_as_it_passes_the_cap(capped_app: FastAPI,
                                                                 tmp_path: Path) -> None:
    """No Content-Length: the multipart parser gets the chunks until the count passes the cap, then 413; nothing
    past the cap is pulled, let alone spooled."""
    with hostile.spent() as used:
        status, headers, body, pulled = asgi_post(capped_app, "/v1/datasets", MULTIPART,
                                                  endless(hostile.multipart_head()))
    limit = MIB + 1024 * 1024
    assert status == 413 and headers["connection"] == "close", body
    assert limit < pulled <= limit + 64 * 1024  # the chunk that crossed the cap, no more
    assert json.loads(body)["limit"] == "HUBTUNE_MAX_UPLOAD_BYTES"
    assert used.written < limit + MIB and used.peak_rss_growth < 32 * MIB
    assert list((tmp_path / "home" / "artifacts" / "datasets").iterdir()) == []


def test_json_endpoints_have_the_small_cap(capped_app: FastAPI) -> None:
    payload = b'{"dataset_id": "' + b"x" * 100_000 + b'"}'
    for headers in ({"content-type": "application/json", "content-length": str(len(payload))},
                    {"content-type": "application/json"}):  # declared, then chunked
        status, _, body, pulled = asgi_post(capped_app, "/v1/jobs", headers,
                                            [payload[i:i + 8192] for i in range(0, len(payload), 8192)])
        problem = json.loads(body)
        assert (status, problem["limit"], problem["limit_value"]) == (413, "HUBTUNE_MAX_REQUEST_BYTES", 64 * 1024)
        assert pulled <= 64 * 1024 + 8192
    # under the cap the request reaches its route (here: no such dataset)
    status, _, _, _ = asgi_post(capped_app, "/v1/jobs", {"content-type": "application/json"}, [b'{"dataset_id": "x"}'])
    assert status in (404, 422)


def test_the_middleware_answers_where_no_exception_handler_does() -> None:
    """Around any ASGI app (one reading its body before FastAPI's handlers could catch the 413), the middleware
    answers itself, still with problem+json."""
    async def reads_everything(scope: dict, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"read"})

    app = BodyLimit(reads_everything, request_limit=10_000, upload_limit=MIB)
    status, headers, body, pulled = asgi_post(app, "/anything", {}, endless(b"", chunk=4096))
    assert (status, headers["content-type"], pulled) == (413, "application/problem+json", 12_288)
    assert json.loads(body)["limit"] == "HUBTUNE_MAX_REQUEST_BYTES"
    assert asgi_post(app, "/anything", {}, [b"x" * 100])[0] == 200


@pytest.mark.parametrize("name", ["d.csv", "d.zip"])
def test_an_upload_under_the_cap_is_stored_and_leaves_no_scratch(tmp_path: Path, name: str) -> None:
    if name == "d.csv":
        content = b"text,label\n" + b"".join(b"row %d,%s\n" % (i, b"ab"[i % 2:i % 2 + 1]) for i in range(20_000))
    else:
        content = hostile.pixel_zip(tmp_path / "px.zip", images=6, width=300, height=200).read_bytes()
    with TestClient(make_app(tmp_path / "home", max_upload_bytes=MIB), base_url="http://127.0.0.1") as client:
        response = client.post("/v1/datasets", files={"file": (name, content)}, data={"task": "classification"})
        assert response.status_code == 201, response.text
        datasets = tmp_path / "home" / "artifacts" / "datasets"
        assert [p.name for p in datasets.iterdir()] == [response.json()["id"]]
        assert [p.name for p in (datasets / response.json()["id"]).iterdir()] == ["data.parquet"]


# ---- item 5: zips ---------------------------------------------------------------------------------------------
def test_a_member_that_lies_about_its_size_is_caught_while_streaming(tmp_path: Path) -> None:
    path = hostile.lying_zip(tmp_path / "lie.zip", declared=100, actual=256 * MIB)  # ~260 KB on disk
    with hostile.spent() as used:
        problem = rejected(path, "zip", UploadLimits(max_upload_bytes=MIB))
    assert (problem.status, problem.title, problem.path) == (422, "zip member larger than it declares", "dog/2.png")
    assert (problem.limit, problem.limit_value) == ("declared size", 100) and "100 bytes" in problem.detail
    assert used.cpu_seconds < 0.5 and used.peak_rss_growth < 32 * MIB  # the old read inflated it whole: +512 MB


def test_an_honest_zip_bomb_is_refused_on_its_declared_sizes(tmp_path: Path) -> None:
    path = hostile.zip_bomb(tmp_path / "bomb.zip", member_bytes=64 * MIB)
    with hostile.spent() as used:
        member = rejected(path, "zip", UploadLimits(max_image_bytes=8 * MIB))
        total = rejected(path, "zip", UploadLimits(max_upload_bytes=100 * MIB))
    assert (member.status, member.title, member.path) == (422, "zip member too large", "class0/0.png")
    assert (member.limit, member.limit_value) == ("HUBTUNE_MAX_IMAGE_BYTES", 8 * MIB)
    assert f"declares {64 * MIB} bytes" in member.detail and "(HUBTUNE_MAX_IMAGE_BYTES)" in member.detail
    assert (total.path, total.limit, total.limit_value) == ("class1/1.png", "HUBTUNE_MAX_UPLOAD_BYTES", 100 * MIB)
    assert used.cpu_seconds < 1.5 and used.peak_rss_growth < 80 * MIB  # the first member of `total` is read (64 MB)


def test_pixels_are_counted_from_the_header_before_decoding(tmp_path: Path) -> None:
    """A header claiming 10 gigapixels with no data behind it: refused as too large, not found broken by a decoder
    (which would first have to allocate 30 GB)."""
    path = make_zip(tmp_path / "d.zip", {"a/1.png": hostile.png(), "b/2.png": hostile.png_header_only(100_000,
                                                                                                        100_000)})
    problem = rejected(path, "zip")
    assert (problem.title, problem.path, problem.row) == ("image too large", "b/2.png", 2)
    assert (problem.limit, problem.limit_value) == ("HUBTUNE_MAX_IMAGE_PIXELS", 40_000_000)
    assert "10000000000 pixels" in problem.detail  # beyond Pillow's own bound: its header check names the count
    moderate = make_zip(tmp_path / "m.zip", {"a/1.png": hostile.png(), "b/2.png": hostile.png_header_only(9000,
                                                                                                         9000)})
    problem = rejected(moderate, "zip")  # under Pillow's bound, over ours
    assert (problem.title, problem.path, problem.limit) == ("image too large", "b/2.png", "HUBTUNE_MAX_IMAGE_PIXELS")
    assert "9000×9000 = 81000000 pixels" in problem.detail


def test_a_pixel_bomb_stops_at_the_upload_pixel_cap(tmp_path: Path) -> None:
    path = hostile.pixel_zip(tmp_path / "px.zip", images=40, width=2000, height=2000)  # 4 MP each, 40 KB in all
    with hostile.spent() as used:
        problem = rejected(path, "zip", UploadLimits(max_upload_pixels=10_000_000))
    assert (problem.title, problem.row) == ("too many pixels", 3)  # two decoded, the third refused by its header
    assert (problem.limit, problem.limit_value) == ("HUBTUNE_MAX_UPLOAD_PIXELS", 10_000_000)
    assert problem.path and problem.path.endswith(".png")
    assert used.cpu_seconds < 1.0  # all 40 decoded: ~2 s here


def test_zip_limits_come_back_as_problem_json(tmp_path: Path) -> None:
    with TestClient(make_app(tmp_path / "home", max_image_bytes=MIB), base_url="http://127.0.0.1") as client:
        content = hostile.zip_bomb(tmp_path / "bomb.zip", member_bytes=8 * MIB).read_bytes()
        response = client.post("/v1/datasets", files={"file": ("d.zip", content)}, data={"task": "classification"})
    assert response.status_code == 422 and response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert (body["path"], body["field"], body["limit"], body["limit_value"]) == (
        "class0/0.png", "file", "HUBTUNE_MAX_IMAGE_BYTES", MIB)


def test_settings_defaults_are_the_limits_defaults() -> None:
    settings = Settings()
    assert UploadLimits() == UploadLimits(max_upload_bytes=settings.max_upload_bytes,
                                          max_image_bytes=settings.max_image_bytes,
                                          max_image_pixels=settings.max_image_pixels,
                                          max_upload_pixels=settings.max_upload_pixels)


# ---- item 6: CSV and Parquet ----------------------------------------------------------------------------------
def test_a_100k_column_csv_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    path.write_bytes(hostile.wide_csv(100_000))
    with hostile.spent() as used:
        problem = rejected(path, "csv")
    assert (problem.title, problem.limit_value) == ("too many columns", tabular.MAX_COLUMNS)
    assert "100000 columns" in problem.detail and used.cpu_seconds < 0.5  # the old check: ~125 s


def test_header_checks_are_linear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Allowed 200k columns, a 100k-column CSV parses in well under a second; 100k repeated names are refused as
    fast, with a bounded message."""
    monkeypatch.setattr(tabular, "MAX_COLUMNS", 200_000)
    wide = tmp_path / "wide.csv"
    wide.write_bytes(hostile.wide_csv(100_000) + b",".join([b"y"] * 100_000) + b"\n")
    repeated = tmp_path / "repeated.csv"
    repeated.write_bytes(b",".join([b"same"] * 50_000 + [b"text", b"label"] + [b"other"] * 50_000) + b"\nx\n")
    with hostile.spent() as used:
        parsed = parse_dataset(wide, "csv", "classification", "text", "label")
        problem = rejected(repeated, "csv")
    assert parsed.label_names == ["x", "y"]
    assert problem.title == "duplicate column names" and "2 name(s)" in problem.detail
    assert len(problem.detail) < 400
    assert used.cpu_seconds < 1.0


def test_a_long_header_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "long.csv"
    path.write_bytes(hostile.long_header_csv(40 * MIB))
    quoted = tmp_path / "quoted.csv"  # a header record spanning lines inside quotes, just as long
    quoted.write_bytes(b'"' + b"n\n" * (tabular.MAX_HEADER_CHARS // 2 + 1) + b'",label\nx,a\n')
    with hostile.spent() as used:
        problem = rejected(path, "csv")
    assert (problem.title, problem.limit_value) == ("header too long", tabular.MAX_HEADER_CHARS)
    assert used.peak_rss_growth < 24 * MIB and used.cpu_seconds < 0.5  # the old reader: +570 MB, 52 MB of error
    assert rejected(quoted, "csv").title == "header too long"


def test_error_messages_name_the_first_columns_and_a_count(tmp_path: Path) -> None:
    names = [f"column_{i}_{'n' * 80}" for i in range(5_000)]
    path = tmp_path / "many.csv"
    path.write_text(",".join(names) + ",label\n" + ",".join(["x"] * 5_001) + "\n")
    problem = rejected(path, "csv")
    assert problem.title == "unknown column" and len(problem.detail) < 600
    assert problem.detail.endswith(" more") and "column_0_" in problem.detail
    # a single enormous name is cut too
    big = tmp_path / "big.csv"
    big.write_bytes(hostile.long_header_csv(tabular.MAX_HEADER_CHARS - 100))
    assert len(rejected(big, "csv").detail) < 300


def test_a_dictionary_parquet_of_millions_of_rows_is_refused_by_its_metadata(tmp_path: Path) -> None:
    path = hostile.dictionary_parquet(tmp_path / "d.parquet", rows=3_000_000)
    assert path.stat().st_size < 100_000
    with hostile.spent() as used:
        problem = rejected(path, "parquet", UploadLimits(max_upload_bytes=MIB))
    assert (problem.title, problem.limit, problem.limit_value) == ("too many cells", "HUBTUNE_MAX_UPLOAD_BYTES", MIB)
    assert "3000000 rows" in problem.detail
    assert used.peak_rss_growth < 32 * MIB and used.cpu_seconds < 0.5  # read in full: +550 MB


@pytest.mark.parametrize("store_schema", [True, False])
def test_a_repeated_dictionary_value_is_refused_before_it_is_decoded(tmp_path: Path, store_schema: bool) -> None:
    """2,000 rows sharing one 1 MB text: a 2 GB column once decoded, in a file and metadata of about 1 MB. Without
    Arrow's schema in the file the reader would decode it unless told to keep the dictionary."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = pa.DictionaryArray.from_arrays(pa.array(np.zeros(2000, dtype=np.int32)), pa.array(["t" * MIB]))
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": text, "label": pa.array(["a", "b"] * 1000)}), path, store_schema=store_schema)
    with hostile.spent() as used:
        problem = rejected(path, "parquet", UploadLimits(max_upload_bytes=8 * MIB))
    assert (problem.title, problem.limit_value) == ("too large once decoded", 8 * MIB)
    assert used.peak_rss_growth < 48 * MIB


def test_image_parquet_with_a_repeated_image_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.DictionaryArray.from_arrays(pa.array(np.zeros(4000, dtype=np.int32)),
                                           pa.array([hostile.png(trailing=MIB)], pa.binary()))
    path = tmp_path / "img.parquet"
    pq.write_table(pa.table({"img": image, "label": pa.array(["a", "b"] * 2000)}), path, store_schema=False)
    with hostile.spent() as used:
        problem = rejected(path, "parquet", UploadLimits(max_upload_bytes=16 * MIB), image_column="img")
    assert problem.title == "too large once decoded" and used.peak_rss_growth < 64 * MIB


def test_a_wide_parquet_is_refused_by_its_metadata(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "wide.parquet"
    pq.write_table(pa.table({f"c{i}": pa.array([1], pa.int8()) for i in range(tabular.MAX_COLUMNS + 1)}), path)
    with hostile.spent() as used:
        problem = rejected(path, "parquet")
    assert problem.title == "too many columns" and used.cpu_seconds < 2.0


def test_parquet_within_the_limits_still_reads(tmp_path: Path) -> None:
    """Dictionary-encoded and list columns come back as plain values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = pa.array(["one", "two", "three", "four"]).dictionary_encode()
    tags = pa.array([["a"], ["b", "a"], [], ["b"]], pa.list_(pa.string()))
    path = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"text": text, "label": tags}), path)
    parsed = parse_dataset(path, "parquet", "multilabel", "text", "label", limits=UploadLimits(max_upload_bytes=200))
    assert parsed.examples == ["one", "two", "three", "four"] and parsed.label_names == ["a", "b"]


# ---- item 7: scratch left by a killed API ---------------------------------------------------------------------
HOLD_SCRATCH = """
import sys, time
from pathlib import Path
from service.datasets import upload_scratch
with upload_scratch(Path(sys.argv[1])) as folder:
    (folder / "upload").write_bytes(b"x" * 1000)
    print(folder, flush=True)
    time.sleep(60)
"""


def test_scratch_of_a_killed_process_is_swept_and_a_live_ones_is_kept(tmp_path: Path) -> None:
    datasets = tmp_path / "home" / "artifacts" / "datasets"
    datasets.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SCRATCH, str(datasets)], stdout=subprocess.PIPE,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, text=True)
    try:
        folder = Path(holder.stdout.readline().strip())  # type: ignore[union-attr]
        assert (folder / "upload").is_file()
        assert dataset_files.sweep_scratch(datasets) == []  # its process is alive: kept
        holder.send_signal(signal.SIGKILL)  # killed mid-upload: nothing of its own cleans up
        holder.wait(timeout=10)
        assert (folder / "upload").is_file()
        legacy = datasets / ".upload-0123abcd"  # what versions before the scratch folders left
        legacy.write_bytes(b"x")
        fresh_legacy = datasets / ".upload-4567ef"
        fresh_legacy.write_bytes(b"x")
        old = time.time() - dataset_files.STALE_SECONDS - 60
        os.utime(legacy, (old, old))
        make_app(tmp_path / "home")  # the API starting sweeps
        assert not folder.parent.exists() and not legacy.exists()
        assert fresh_legacy.exists()  # too recent to know it is dead
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()

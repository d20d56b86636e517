"""Uploads against a real `hubtune serve` process (issue 19, items 4 and 7): the body cap answers a 10 GB
Content-Length and a chunked stream at once, over real sockets, without the server spooling them; an API killed
mid-upload leaves scratch that the next one removes. The server's CPU, peak RSS and bytes written are read from
/proc. On SQLite only: nothing here reaches the database before the body is refused (and item 7's sweep is of
files), so PostgreSQL behaves the same.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import hostile_uploads as hostile
from tests.integration.conftest import Stack, _make_stack

MIB = hostile.MIB


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One API process, keyless on loopback, with the upload cap at 1 MB."""
    yield from _make_stack("sqlite", tmp_path_factory.mktemp("capped"), HUBTUNE_MAX_UPLOAD_BYTES=str(MIB),
                           HUBTUNE_AUTH="auto")


def port(stack: Stack) -> int:
    return int(stack.url.rsplit(":", 1)[1])


def test_a_10_gb_content_length_is_answered_at_once(capped: Stack) -> None:
    assert capped.api is not None
    with hostile.spent(capped.api.pid) as used:
        answer = hostile.send_declared("127.0.0.1", port(capped), 10 * 1024 ** 3, 1024, timeout=10)
    assert answer.status == 413 and answer.seconds < 2, answer  # it used to hang until the client gave up
    assert answer.headers["content-type"] == "application/problem+json" and answer.headers["connection"] == "close"
    assert b"HUBTUNE_MAX_UPLOAD_BYTES" in answer.body
    assert used.cpu_seconds < 0.5 and used.peak_rss_growth < 16 * MIB and used.written < MIB


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_cap(capped: Stack) -> None:
    assert capped.api is not None
    with hostile.spent(capped.api.pid) as used:
        answer = hostile.send_chunked("127.0.0.1", port(capped), 256 * MIB, timeout=10)
    assert answer.status == 413 and answer.seconds < 5, answer
    assert answer.headers["content-type"] == "application/problem+json"
    # The server stopped reading at the cap (+1 MiB for the form) and closed: the client could not push the rest
    # (what it did send beyond the cap sat in socket buffers); the server spooled at most the cap.
    assert answer.sent < 32 * MIB
    assert used.written < 4 * MIB and used.peak_rss_growth < 32 * MIB, used


def test_the_cap_leaves_the_server_serving(capped: Stack) -> None:
    content = b"text,label\n" + b"".join(b"row %d,%s\n" % (i, b"ab"[i % 2:i % 2 + 1]) for i in range(1000))
    response = httpx.post(f"{capped.url}/v1/datasets", files={"file": ("d.csv", content)},
                          data={"task": "classification"}, timeout=30)
    assert response.status_code == 201, response.text


def scratch_files(datasets: Path) -> list[Path]:
    """Files of uploads in progress (any version's naming: .upload-*)."""
    return [p for p in datasets.rglob("*") if p.is_file() and ".upload-" in str(p.relative_to(datasets))
            and p.name != ".lock"]


def test_scratch_of_an_api_killed_mid_upload_is_removed_by_the_next(tmp_path: Path) -> None:
    rows = b"".join(b"text %d with a few words,%s\n" % (i, b"ab"[i % 2:i % 2 + 1]) for i in range(600_000))
    content = b"text,label\n" + rows  # ~20 MB: its parse takes long enough to be caught in it
    for stack in _make_stack("sqlite", tmp_path, HUBTUNE_AUTH="auto"):
        assert stack.api is not None
        datasets = stack.home / "artifacts" / "datasets"
        upload = threading.Thread(target=_post_ignoring_errors, args=(stack.url, content), daemon=True)
        upload.start()
        deadline = time.monotonic() + 60
        while not scratch_files(datasets) and time.monotonic() < deadline:
            time.sleep(0.005)
        left = scratch_files(datasets)
        assert left, "the upload never reached its scratch file"
        os.killpg(stack.api.pid, signal.SIGKILL)  # the API dies mid-parse
        stack.api.wait(timeout=10)
        upload.join(timeout=30)
        assert all(p.exists() for p in left)  # nothing of its own removed them
        stack.start_api()
        assert scratch_files(datasets) == [] and not any(p.exists() for p in left)
        assert [p for p in datasets.iterdir()] == []  # no dataset folder either: none was committed


def _post_ignoring_errors(url: str, content: bytes) -> None:
    try:
        httpx.post(f"{url}/v1/datasets", files={"file": ("d.csv", content)}, data={"task": "classification"},
                   timeout=60)
    except httpx.HTTPError:
        pass  # the server was killed under it

"""`hubtune serve` as a process (issue 19, item 12): its worker child never outlives it, and a stop signal ends it
within its grace period even while a request thread is busy."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.integration.conftest import REPO, free_port
from tests.integration.faults import _descendants, process_alive


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBTUNE_")}
    env.update({"HUBTUNE_HOME": str(home), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra})
    return env


def _serve(tmp_path: Path, *args: str, **extra_env: str) -> tuple[subprocess.Popen, str, Path]:
    home = tmp_path / "home"
    log = tmp_path / "serve.log"
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), *args],
                               cwd=tmp_path, env=_env(home, **extra_env), stdout=log.open("wb"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code in (200, 503):
                return process, url, home
        except httpx.HTTPError:
            pass
        assert process.poll() is None, log.read_text()
        time.sleep(0.2)
    raise AssertionError("serve did not start:\n" + log.read_text())




def _wait_until(predicate, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_a_sigkilled_serve_leaves_no_worker_process_behind(tmp_path: Path) -> None:
    serve, _url, _home = _serve(tmp_path)
    log = tmp_path / "serve.log"
    try:
        assert _wait_until(lambda: "worker child process pid" in log.read_text(), 30), log.read_text()
        worker = int(re.search(r"worker child process pid (\d+)", log.read_text()).group(1))
        # the Celery main process and its pool child (forked once Celery is up)
        assert _wait_until(lambda: len(_descendants(worker)) >= 1, 90), log.read_text()
        family = [worker, *_descendants(worker)]
        serve.send_signal(signal.SIGKILL)
        serve.wait(timeout=10)
        killed_at = time.monotonic()
        assert _wait_until(lambda: not any(process_alive(pid) for pid in family), 5), \
            [pid for pid in family if process_alive(pid)]
        assert time.monotonic() - killed_at < 5
    finally:
        for pid in [serve.pid, *_descendants(serve.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_sigterm_ends_serve_within_its_grace_while_a_request_is_busy(tmp_path: Path) -> None:
    """A write request waits on a SQLite lock this test holds (busy timeout 60 s here): SIGTERM must still end
    serve within its 2 s grace and the shutdown's own few seconds, not when the request thread is done."""
    serve, url, home = _serve(tmp_path, "--no-worker", HUBTUNE_SHUTDOWN_GRACE_SECONDS="2",
                              HUBTUNE_DB_STATEMENT_TIMEOUT_SECONDS="60")
    lock = sqlite3.connect(home / "hubtune.db", isolation_level=None, timeout=10)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        answers: list[object] = []

        def busy_request() -> None:
            try:
                answers.append(httpx.post(f"{url}/v1/models", json={"source": "hf", "repo_id": "org/busy"},
                                          timeout=90).status_code)
            except httpx.HTTPError as exc:
                answers.append(type(exc).__name__)

        thread = threading.Thread(target=busy_request, daemon=True)
        thread.start()
        time.sleep(1.5)
        assert not answers, answers  # still waiting on the lock
        started = time.monotonic()
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)
        took = time.monotonic() - started
        assert took < 8, f"serve took {took:.1f} s to stop"
        thread.join(timeout=5)
        assert answers and answers[0] != 201, answers  # the busy request was cut off, not completed
    finally:
        lock.close()
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)

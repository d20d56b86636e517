"""The lifelines of `hubtune serve`'s worker: a pool child never outlives the Celery process that forked it, even
when that process dies between the fork and the child's init handler."""

from __future__ import annotations

import os
import select
import time

import pytest

from workers import celery_app


def _read_until_closed(fd: int, timeout: float) -> bytes:
    got, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 64)
            if not chunk:
                return got
            got += chunk
    raise AssertionError(f"the pool child still holds the pipe after {timeout} s: {got!r}")


def _forked(body) -> int:  # type: ignore[no-untyped-def]
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    return pid


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_pool_child_whose_worker_died_before_its_init_handler_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(celery_app.PARENT_PID_ENV, raising=False)
    read_end, write_end = os.pipe()

    def pool_child(worker_pid: int) -> None:
        while os.getppid() == worker_pid:  # the worker is gone before this child's init runs
            time.sleep(0.01)
        celery_app._die_with_worker()
        os.write(write_end, b"survived")

    def worker() -> None:
        celery_app._die_with_serve()
        me = os.getpid()
        _forked(lambda: pool_child(me))

    os.waitpid(_forked(worker), 0)
    os.close(write_end)
    try:
        assert _read_until_closed(read_end, 10) == b""
    finally:
        os.close(read_end)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_pool_child_of_a_live_worker_keeps_running(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(celery_app.PARENT_PID_ENV, raising=False)
    read_end, write_end = os.pipe()

    def worker() -> None:
        celery_app._die_with_serve()

        def pool_child() -> None:
            celery_app._die_with_worker()
            os.write(write_end, b"running")

        os.waitpid(_forked(pool_child), 0)

    os.waitpid(_forked(worker), 0)
    os.close(write_end)
    try:
        assert _read_until_closed(read_end, 10) == b"running"
    finally:
        os.close(read_end)

"""Private PostgreSQL and Redis servers that a test may stop, restart, freeze (SIGSTOP) and thaw (SIGCONT), on ports
of their own: the shared servers on 5432 and 6379 are never touched."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from glob import glob
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class _Server:
    """A server process in its own session, so freezing or stopping it reaches every process it forked."""

    process: subprocess.Popen | None = None
    port: int

    def _launch(self) -> None:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 30) -> None:
        self._launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready():
                return
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{type(self).__name__} exited with {self.process.returncode}")
            time.sleep(0.1)
        raise RuntimeError(f"{type(self).__name__} did not answer on port {self.port}")

    def _signal_all(self, signum: int) -> None:
        """The server and every process it forked (PostgreSQL's backends each call setsid(), so a process group
        does not reach them)."""
        if self.process is None or self.process.poll() is not None:
            return
        for pid in [self.process.pid, *_descendants(self.process.pid)]:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def freeze(self) -> None:
        self._signal_all(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal_all(signal.SIGCONT)

    def stop(self, timeout: float = 20) -> None:
        """A clean, fast shutdown (what `pg_ctl stop -m fast` or `redis-cli shutdown` does)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.thaw()
        self._signal_all(self._stop_signal)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._signal_all(signal.SIGKILL)
            self.process.wait(timeout=10)
        while _answers(self.port):  # forked children may hold the port a moment longer
            time.sleep(0.05)

    _stop_signal = signal.SIGTERM


def process_alive(pid: int) -> bool:
    """Running (a zombie whose parent is gone counts as gone: it runs nothing and holds nothing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _descendants(root: int) -> list[int]:
    """The pids below `root` in the process tree, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        pid, ppid = int(text.split(" ", 1)[0]), int(text.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class PrivatePostgres(_Server):
    """initdb into a temporary folder, then `postgres` on a free port of 127.0.0.1 (trust, user postgres)."""

    _stop_signal = signal.SIGINT  # fast shutdown

    def __init__(self) -> None:
        binaries = sorted(glob("/usr/lib/postgresql/*/bin/postgres"))
        if not binaries:
            pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql")
        self.bin = Path(binaries[-1]).parent
        self.port = free_port()
        # Not under pytest's tmp_path: a root-owned 0700 folder that the postgres user cannot enter.
        self.dir = Path(tempfile.mkdtemp(prefix="hubtune-pg-"))
        self.data = self.dir / "data"
        self._demote, owner = _postgres_user()
        if owner is not None:
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        subprocess.run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E",
                        "UTF8", "--no-sync", "--no-instructions"], check=True, capture_output=True,
                       preexec_fn=self._demote, timeout=120)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _launch(self) -> None:
        log = (self.dir / "postgres.log").open("ab")
        self.process = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
             "-c", "unix_socket_directories=", "-c", "fsync=off", "-c", "shared_buffers=16MB", "-c",
             "max_connections=60"], stdout=log, stderr=subprocess.STDOUT, preexec_fn=self._demote,
            start_new_session=True)

    def _ready(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.url, connect_timeout=2).close()
            return True
        except psycopg.Error:
            return False

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _postgres_user() -> tuple[Callable[[], None] | None, pwd.struct_passwd | None]:
    """initdb and postgres refuse to run as root: as root, run them as the postgres user."""
    if os.geteuid() != 0:
        return None, None
    try:
        owner = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no postgres user to run a PostgreSQL server as")

    def demote() -> None:
        os.setgid(owner.pw_gid)
        os.setuid(owner.pw_uid)

    return demote, owner


class PrivateRedis(_Server):
    """redis-server on a free port, with an append-only file so a stop and restart keeps the queued messages
    (as the full stack's Redis does: docker-compose.yml runs it with --appendonly yes)."""

    def __init__(self, folder: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.skip("no redis-server")
        self.port = free_port()
        self.dir = folder
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _launch(self) -> None:
        log = (self.dir / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no"], stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)

    def _ready(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

"""A real HubTune stack for integration tests: `hubtune serve --no-worker` and `hubtune worker` as processes,
on either default (SQLite + filesystem broker) or PostgreSQL + Redis on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.tiny_models import make_tiny_bert, make_tiny_llama

REPO = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_available() -> bool:
    try:
        import psycopg

        psycopg.connect(PG_ADMIN_URL, connect_timeout=3).close()
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
        return True
    except Exception:
        return False


@dataclass
class Stack:
    kind: str
    home: Path
    env: dict[str, str]
    url: str
    api: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    cwd: Path | None = None  # an empty folder the processes run in: nothing may be written there

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        log_path = self.home / f"{name}-{len(self.logs)}.log"
        self.logs.append(log_path)
        return subprocess.Popen([sys.executable, "-m", "service.cli", *args], cwd=self.cwd or REPO, env=self.env,
                                stdout=log_path.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)

    def start_api(self) -> None:
        port = int(self.url.rsplit(":", 1)[1])
        self.api = self._spawn(["serve", "--no-worker", "--host", "127.0.0.1", "--port", str(port)], "api")
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.api.poll() is not None:
                break
            time.sleep(0.3)
        raise RuntimeError("API did not start:\n" + self.log_text())

    def start_worker(self) -> subprocess.Popen:
        worker = self._spawn(["worker", "--loglevel", "warning"], "worker")
        self.workers.append(worker)
        return worker

    def kill_worker(self, worker: subprocess.Popen) -> None:
        """SIGKILL the worker's whole process group: the Celery parent and its pool child, mid-task."""
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)

    def cli(self, *args: str, key: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        env = dict(self.env, HUBTUNE_URL=self.url)
        if key:
            env["HUBTUNE_API_KEY"] = key
        return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=self.cwd or REPO, env=env,
                              capture_output=True,
                              text=True, timeout=timeout)

    def create_key(self, name: str, admin: bool = True) -> str:
        """A key for the flows, an admin by default: they register local folders (below HUBTUNE_MODEL_ROOTS, the
        tests' temporary folders), which only an admin may."""
        done = self.cli("keys", "create", "--name", name, *(["--admin"] if admin else []))
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in self.logs if p.exists())

    def stop(self) -> None:
        for proc in [*self.workers, self.api]:
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*self.workers, self.api]:
            if proc is not None:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


def _make_stack(kind: str, tmp: Path, **extra_env: str) -> Iterator[Stack]:
    home = tmp / "home"
    home.mkdir()
    cwd = tmp / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBTUNE_")}
    env.update({
        "HUBTUNE_HOME": str(home), "HUBTUNE_LEASE_SECONDS": "4", "HUBTUNE_HEARTBEAT_SECONDS": "0.5",
        "HUBTUNE_RECONCILE_SECONDS": "1", "HUBTUNE_BOOTSTRAP_SAMPLES": "30", "HUBTUNE_AUTH": "required",
        "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "HUBTUNE_MODEL_ROOTS": str(tmp.parent),  # pytest's base folder: the tiny hub and each test's own models
    })
    env.update(extra_env)
    database = None
    if kind == "postgres":
        import psycopg
        import redis

        database = f"hubtune_test_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {database}")
        redis_db = 11
        redis.Redis.from_url(f"{REDIS_URL}/{redis_db}").flushdb()
        env["HUBTUNE_DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:5432/{database}"
        env["HUBTUNE_BROKER_URL"] = f"{REDIS_URL}/{redis_db}"
    stack = Stack(kind=kind, home=home, env=env, url=f"http://127.0.0.1:{free_port()}", cwd=cwd)
    try:
        stack.start_api()
        yield stack
    finally:
        stack.stop()
        if database:
            import psycopg

            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
                admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    if request.param == "postgres" and not postgres_available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL/Redis on 127.0.0.1 are required in CI")
        pytest.skip("PostgreSQL/Redis not reachable on 127.0.0.1")
    yield from _make_stack(request.param, tmp_path)


@pytest.fixture(scope="session")
def tiny_hub(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three tiny, different models: two BERT widths and a decoder."""
    root = tmp_path_factory.mktemp("tiny-hub")
    return {
        "bert-32": make_tiny_bert(root / "bert-32", hidden_size=32, seed=1),
        "bert-64": make_tiny_bert(root / "bert-64", hidden_size=64, seed=2),
        "llama-32": make_tiny_llama(root / "llama-32", hidden_size=32, seed=3),
    }

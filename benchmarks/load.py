"""Load on a real stack: status polling and job listing by 20 and 100 concurrent clients while rank jobs run, and
parallel uploads, on SQLite (+ filesystem broker) and PostgreSQL + Redis. Requests/s, p50/p99 latency, errors,
and each polling figure against the plain full poll (no If-None-Match) measured in the same run.

The stack is tests/integration/conftest.py's: `hubtune serve --no-worker` and `hubtune worker` as processes,
keys required, two tiny BERT models. A rank job is kept running throughout (a new one starts when one ends).
Bounded: each scenario runs `--seconds`, every request has a timeout, and the clients are one asyncio process
(on a small machine they share its cores with the API and the worker, so figures are of the whole machine).

    python -m benchmarks.load [--kinds sqlite,postgres] [--clients 20,100] [--seconds 5]
        [--code PATH]   # run the API and worker from another checkout (e.g. before a change), same scenarios
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.integration.conftest import PG_ADMIN_URL, REDIS_URL, Stack, _make_stack, postgres_available
from tests.tiny_models import make_tiny_bert

TIMEOUT = httpx.Timeout(30.0)
# Not the integration tests' Redis database (11): their workers, flushing and consuming it, would take this run's
# messages.
REDIS_DB = 14


@dataclass
class Outcome:
    """What one scenario measured."""

    scenario: str
    clients: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


Request = Callable[[httpx.AsyncClient, dict[str, str]], Awaitable[httpx.Response]]


async def run_clients(base: str, key: str, request: Request, clients: int, seconds: float, name: str,
                      ok: tuple[int, ...] = (200, 304), etag_state: bool = False) -> Outcome:
    """`clients` loops sending `request` until `seconds` pass. With etag_state each client sends back the last ETag
    it got, as a polling client would."""
    outcome = Outcome(name, clients, seconds)
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT, limits=limits,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        async def one_client() -> None:
            headers: dict[str, str] = {}
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                try:
                    response = await request(client, headers)
                except httpx.HTTPError:
                    outcome.errors += 1
                    continue
                outcome.latencies.append(time.perf_counter() - began)
                outcome.statuses[response.status_code] = outcome.statuses.get(response.status_code, 0) + 1
                if response.status_code not in ok:
                    outcome.errors += 1
                if etag_state and "etag" in response.headers:
                    headers = {"If-None-Match": response.headers["etag"]}

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return outcome


class RankKeeper:
    """Keeps one rank job running: submits another whenever the last one ended."""

    def __init__(self, base: str, key: str, dataset_id: str) -> None:
        self.base, self.key, self.dataset_id = base, key, dataset_id
        self.job_id: str | None = None
        self.started = 0
        self.finished: dict[str, int] = {}
        self._stop = asyncio.Event()
        self.running = asyncio.Event()  # a job was seen running: the worker is up

    async def submit(self, client: httpx.AsyncClient) -> str:
        created = await client.post("/v1/jobs", json={"dataset_id": self.dataset_id, "metrics": ["logme"]})
        created.raise_for_status()
        self.started += 1
        return created.json()["id"]

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.base, timeout=TIMEOUT,
                                     headers={"Authorization": f"Bearer {self.key}"}) as client:
            self.job_id = await self.submit(client)
            while not self._stop.is_set():
                status = (await client.get(f"/v1/jobs/{self.job_id}")).json()["status"]
                if status == "running":
                    self.running.set()
                if status in ("succeeded", "failed", "cancelled"):
                    self.finished[status] = self.finished.get(status, 0) + 1
                    self.job_id = await self.submit(client)
                try:
                    await asyncio.wait_for(self._stop.wait(), 0.5)
                except TimeoutError:
                    pass

    def stop(self) -> None:
        self._stop.set()


def dataset_csv(rows: int) -> bytes:
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    lines = ["text,label"] + [f"{words[i % 8]} {words[(i * 7) % 8]} item {i},{'ab'[i % 2]}" for i in range(rows)]
    return ("\n".join(lines) + "\n").encode()


async def measure(stack: Stack, key: str, clients_list: list[int], seconds: float, with_etag: bool,
                  models_root: Path) -> list[Outcome]:
    """Every scenario on one stack. with_etag: the code under test has ETag and /status (after the change)."""
    base = stack.url
    async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT, headers={"Authorization": f"Bearer {key}"}) as c:
        dataset = (await c.post("/v1/datasets", files={"file": ("d.csv", dataset_csv(2000))},
                                data={"task": "classification"})).json()["id"]
        for name, width in (("bert-32", 32), ("bert-48", 48)):
            folder = models_root / name
            if not folder.exists():
                make_tiny_bert(folder, hidden_size=width, seed=width)
            (await c.post("/v1/models", json={"source": "local", "path": str(folder), "name": name})).raise_for_status()
    keeper = RankKeeper(base, key, dataset)
    keeping = asyncio.create_task(keeper.run())
    await asyncio.wait_for(keeper.running.wait(), 120)  # the worker has started (imports torch) and claimed one
    outcomes: list[Outcome] = []

    def poll(suffix: str = "") -> Request:
        async def get(client: httpx.AsyncClient, headers: dict[str, str]) -> httpx.Response:
            return await client.get(f"/v1/jobs/{keeper.job_id}{suffix}", headers=headers)
        return get

    async def listing(client: httpx.AsyncClient, _headers: dict[str, str]) -> httpx.Response:
        return await client.get("/v1/jobs", params={"limit": 20})

    upload_body = dataset_csv(3000)

    async def upload(client: httpx.AsyncClient, _headers: dict[str, str]) -> httpx.Response:
        return await client.post("/v1/datasets", files={"file": ("u.csv", upload_body)},
                                 data={"task": "classification"})

    # the listings first, so that both runs of a before/after comparison list about as many jobs
    for clients in clients_list:
        outcomes.append(await run_clients(base, key, listing, clients, seconds, "list GET /v1/jobs?limit=20"))
    for clients in clients_list:
        outcomes.append(await run_clients(base, key, poll(), clients, seconds, "poll GET /v1/jobs/{id}"))
        if with_etag:
            outcomes.append(await run_clients(base, key, poll(), clients, seconds,
                                              "poll /v1/jobs/{id}, If-None-Match", etag_state=True))
            outcomes.append(await run_clients(base, key, poll("/status"), clients, seconds,
                                              "poll /v1/jobs/{id}/status"))
            outcomes.append(await run_clients(base, key, poll("/status"), clients, seconds,
                                              "poll /status, If-None-Match", etag_state=True))
    outcomes.append(await run_clients(base, key, upload, 8, seconds, f"upload {len(upload_body) // 1024} KiB CSV",
                                      ok=(201,)))
    keeper.stop()
    await keeping
    print(f"  rank jobs during the run: {keeper.started} started, finished {keeper.finished}", flush=True)
    return outcomes


def postgres_stack(tmp: Path, extra: dict[str, str]) -> Iterator[Stack]:
    """_make_stack's PostgreSQL + Redis stack on a scratch database and this benchmark's own Redis database."""
    import psycopg
    import redis

    database = f"hubtune_load_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {database}")
    redis.Redis.from_url(f"{REDIS_URL}/{REDIS_DB}").flushdb()
    try:
        # the SQLite stack with these URLs: its own setup adds nothing for a database it was not told of
        yield from _make_stack("sqlite", tmp, **extra, HUBTUNE_BROKER_URL=f"{REDIS_URL}/{REDIS_DB}",
                               HUBTUNE_DATABASE_URL=f"postgresql://postgres@127.0.0.1:5432/{database}")
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def table(kind: str, code: str, outcomes: list[Outcome]) -> list[str]:
    rows = ["| database | code | scenario | clients | req/s | p50 ms | p99 ms | errors | 304s | req/s vs plain poll |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    plain = {o.clients: o for o in outcomes if o.scenario == "poll GET /v1/jobs/{id}"}
    for o in outcomes:
        base = plain.get(o.clients) if o.scenario.startswith("poll") else None
        ratio = f"{o.rate / base.rate:.2f}x" if base and base.rate else ""
        not_modified = o.statuses.get(304, 0) / max(1, len(o.latencies))
        rows.append(f"| {kind} | {code} | {o.scenario} | {o.clients} | {o.rate:.0f} | {o.percentile(0.5):.0f} | "
                    f"{o.percentile(0.99):.0f} | {o.errors} | {not_modified:.0%} | "
                    f"{ratio} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="sqlite,postgres")
    parser.add_argument("--clients", default="20,100")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--code", default=None, help="a checkout whose service/ and workers/ the stack runs")
    parser.add_argument("--label", default=None, help="the code column of the table (default: this or --code)")
    parser.add_argument("--json", default=None, help="also write the outcomes here")
    args = parser.parse_args(argv)
    clients_list = [int(c) for c in args.clients.split(",")]
    code = Path(args.code).resolve() if args.code else None
    label = args.label or (code.name if code else "this checkout")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} "
          f"{platform.python_version()}; {args.seconds:g} s per scenario", flush=True)
    lines, dumped = [], []
    for kind in args.kinds.split(","):
        if kind == "postgres" and not postgres_available():
            print("PostgreSQL/Redis not reachable: skipped", flush=True)
            continue
        with tempfile.TemporaryDirectory(prefix="hubtune-load-") as tmp:
            work = Path(tmp) / "stack"
            work.mkdir()
            extra = {"PYTHONPATH": str(code)} if code else {}
            stacks = _make_stack(kind, work, **extra) if kind == "sqlite" else postgres_stack(work, extra)
            stack = next(stacks)
            try:
                stack.start_worker()
                key = stack.create_key("load")
                with_etag = httpx.get(f"{stack.url}/openapi.json").json()["paths"].get("/v1/jobs/{job_id}/status")
                print(f"{kind} ({label}): stack up at {stack.url}", flush=True)
                outcomes = asyncio.run(measure(stack, key, clients_list, args.seconds, bool(with_etag),
                                               Path(tmp) / "models"))
            finally:
                stacks.close()
        lines += table(kind, label, outcomes)[0 if not lines else 2:]
        dumped += [{"database": kind, "code": label, "scenario": o.scenario, "clients": o.clients,
                    "rps": round(o.rate, 1), "p50_ms": round(o.percentile(0.5), 1),
                    "p99_ms": round(o.percentile(0.99), 1), "errors": o.errors, "statuses": o.statuses,
                    "median_ms": round(statistics.median(o.latencies) * 1000, 1) if o.latencies else None}
                   for o in outcomes]
        print("\n".join(lines), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dumped, indent=1))


if __name__ == "__main__":
    main()

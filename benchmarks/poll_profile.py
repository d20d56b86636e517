"""Where one status poll (GET /v1/jobs/{id}) spends its time: the app in-process, a finished 8-model rank job, an
API key required, N polls under cProfile, the top functions by their own time.

Sync routes and dependencies normally run in Starlette's thread pool, where cProfile does not follow; here they run
inline on the event loop's thread so the profile sees the whole request (the thread hop itself is left out).

    python -m benchmarks.poll_profile [--polls 300] [--database-url postgresql://...] [--path-suffix ?view=status]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from service.app import create_app
from service.db import Dataset, HubModel, Job, RankingEntry, session_factory
from service.security import ADMIN, create_key
from service.settings import Settings


def finished_job(sessions: Any, owner: str, models: int = 8) -> str:
    """A succeeded rank job over `models` candidates, as the runner leaves it."""
    dataset_id, job_id = uuid.uuid4().hex, uuid.uuid4().hex
    with sessions.begin() as session:
        session.add(Dataset(id=dataset_id, owner=owner, filename="d.csv", format="csv", task="classification",
                            text_column="text", label_column="label", rows=1000, label_names=["a", "b"],
                            storage_path="/nowhere/d.parquet", size_bytes=1000, sha256="0" * 64))
        ids = [uuid.uuid4().hex for _ in range(models)]
        for i, model_id in enumerate(ids):
            session.add(HubModel(id=model_id, name=f"model-{i}", source="hf", locator=f"org/model-{job_id[:8]}-{i}"))
    summary = {"ranked_by": {"estimator": "logme", "pooling": "mean", "layers": "last"},
               "verdict": {"top": ids[0], "confident": False, "indistinguishable_from_top": ids[1:3],
                           "summary": "model-0 leads; model-1 and model-2 are within noise"}}
    with sessions.begin() as session:
        session.add(Job(id=job_id, owner=owner, dataset_id=dataset_id, candidates=ids, metrics=["logme"],
                        status="succeeded", stage="done", progress=1.0, ranking_summary=summary))
    with sessions.begin() as session:
        for rank, model_id in enumerate(ids, start=1):
            session.add(RankingEntry(job_id=job_id, model_id=model_id, rank=rank, feature_seconds=1.5,
                                     scores={"logme": -0.5 + rank / 100},
                                     details={"intervals": {"logme": [-0.6, -0.4]}, "p_better_than_next": 0.7,
                                              "features_cached": False, "feature_dim": 384, "beats_prior": True}))
    return job_id


def _run_inline() -> None:
    """Sync handlers on the loop's thread (see the module's docstring)."""
    import fastapi.dependencies.utils as dependency_utils
    import fastapi.routing as routing

    async def inline(func: Any, *args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    routing.run_in_threadpool = inline
    dependency_utils.run_in_threadpool = inline


async def poll(app: Any, path: str, key: str, count: int, etag: str | None = None) -> list[int]:
    """`count` GETs of `path` straight into the ASGI app; the statuses."""
    headers = [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {key}".encode())]
    if etag:
        headers.append((b"if-none-match", etag.encode()))
    path_only, _, query = path.partition("?")
    statuses = []
    for _ in range(count):
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict, sent: list[dict] = sent) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": path_only, "raw_path": path_only.encode(), "query_string": query.encode(),
                 "headers": headers, "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "root_path": ""}
        await app(scope, receive, send)
        statuses.append(sent[0]["status"])
    return statuses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=300)
    parser.add_argument("--database-url", default=None, help="default: a SQLite file in a temporary folder")
    parser.add_argument("--path-suffix", default="", help="appended to /v1/jobs/{id}, e.g. ?view=status")
    parser.add_argument("--if-none-match", action="store_true", help="send the first answer's ETag back")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(home=Path(tmp) / "home", database_url=args.database_url, auth="required")
        app = create_app(settings, send=lambda *a: None, run_reconciler=False)
        sessions = session_factory(settings.sqlalchemy_url)
        key, row = create_key(sessions, "profile", ADMIN)
        path = f"/v1/jobs/{finished_job(sessions, row.id)}{args.path_suffix}"
        _run_inline()
        etag = None
        if args.if_none_match:
            etag = _first_etag(app, path, key)
        asyncio.run(poll(app, path, key, 20, etag))  # warm: first-use imports and caches
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        statuses = asyncio.run(poll(app, path, key, args.polls, etag))
        profiler.disable()
        elapsed = time.perf_counter() - started
        print(f"{args.polls} polls of /v1/jobs/{{id}}{args.path_suffix}{' with If-None-Match' if etag else ''} "
              f"({settings.sqlalchemy_url.split(':')[0]}, statuses {sorted(set(statuses))}): "
              f"{elapsed / args.polls * 1e6:.0f} us per poll under cProfile")
        print(breakdown(profiler, args.polls))
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
        print(out.getvalue())
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.top + 15)
        print(out.getvalue())


# The steps of a poll, by function name: what each costs per poll, its callees included.
STEPS = ("solve_dependencies", "caller_for_key", "get_job", "get_job_status", "_job_version", "owned_job",
         "ranking_rows", "job_out", "serialize_response", "_match")


def breakdown(profiler: cProfile.Profile, polls: int) -> str:
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    cost: dict[str, float] = {}
    for (filename, _line, name), (_calls, _primitive, _own, cumulative, _callers) in stats.items():
        if name in STEPS and ("/service/" in filename or "fastapi" in filename):
            cost[name] = max(cost.get(name, 0.0), cumulative)
    return "  ".join(f"{name} {cost[name] / polls * 1e6:.0f} us" for name in STEPS if name in cost)


def _first_etag(app: Any, path: str, key: str) -> str | None:
    captured: list[dict] = []

    async def once() -> None:
        headers = [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {key}".encode())]
        path_only, _, query = path.partition("?")
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": path_only, "raw_path": path_only.encode(), "query_string": query.encode(),
                 "headers": headers, "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "root_path": ""}

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            captured.append(message)

        await app(scope, receive, send)

    asyncio.run(once())
    headers = dict(captured[0].get("headers", []))
    value = headers.get(b"etag")
    return value.decode() if value else None


if __name__ == "__main__":
    main()

"""One 8-candidate rank job on 1, 2 and 4 worker processes (one torch thread each): wall time against the one-worker
run measured in the same invocation, and whether every run ranks exactly alike (scores to the last bit).

Real models (demo.prepare_hub: all-MiniLM-L6-v2, paraphrase-MiniLM-L3-v2, all-mpnet-base-v2, three of them cut to
their first layers, a randomly initialised control) on a BBC News sample, through a real stack (PostgreSQL + Redis
by default, or SQLite + the filesystem broker shared by the workers): the API and `hubtune worker` processes of
tests/integration/conftest.py. Every run starts from an empty HUBTUNE_HOME, so no run reads another's features.

    python -m benchmarks.fanout --hub DIR [--workers 1,2,4] [--rows 300] [--kind postgres|sqlite]

`--hub` is built (or reused) by `python -m demo.prepare_hub --out DIR --models ...` with the models below.
On a GPU machine: `--gpus all` starts the workers as `hubtune worker --gpus all` (one per GPU) instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.load import postgres_stack
from tests.integration.conftest import REPO, Stack, _make_stack
from tests.integration.faults import _descendants

MODELS = ["all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2", "all-mpnet-base-v2", "all-MiniLM-L6-v2-first-3-layers",
          "all-mpnet-base-v2-first-4-layers", "all-mpnet-base-v2-first-8-layers", "all-MiniLM-L6-v2-first-1-layers",
          "random-init-32d"]


def prepare(hub: Path, rows: int) -> Path:
    subprocess.run([sys.executable, "-m", "demo.prepare_hub", "--out", str(hub), "--rows", str(rows),
                    "--models", ",".join(MODELS)], check=True, cwd=REPO)
    return hub / "bbc_news.csv"


def start_workers(stack: Stack, count: int, gpus: str | None) -> list[subprocess.Popen]:
    if gpus:
        worker = stack._spawn(["worker", "--loglevel", "warning", "--gpus", gpus], "worker")
        stack.workers.append(worker)
        return [worker]
    return [stack.start_worker() for _ in range(count)]


def wait_ready(workers: list[subprocess.Popen], gpus: str | None, timeout: float = 300) -> None:
    """Every worker's pool child is forked (it imported torch and consumes from here on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_descendants(w.pid) for w in workers):
            if gpus:
                time.sleep(20)  # one supervisor: give each GPU's worker time to fork its pool
            return
        time.sleep(0.2)
    raise RuntimeError("workers did not start")


def run_once(stack: Stack, hub: Path, data: Path, workers: int, gpus: str | None) -> dict[str, Any]:
    key = stack.create_key("fanout")
    client = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    ids = []
    for name in MODELS:
        response = client.post("/v1/models", json={"source": "local", "path": str(hub / name), "name": name})
        response.raise_for_status()
        ids.append(response.json()["id"])
    form = {"task": "classification", "text_column": "text", "label_column": "label"}
    dataset = client.post("/v1/datasets", files={"file": (data.name, data.read_bytes())}, data=form).json()
    processes = start_workers(stack, workers, gpus)
    wait_ready(processes, gpus)
    began = time.monotonic()
    job_id = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "candidates": ids}).json()["id"]
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.2)
    seconds = time.monotonic() - began
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job['status']}: {job['error']}\n{stack.log_text()}")
    return {"seconds": seconds, "workers_used": len({r["worker"] for r in job["ranking"]}),
            "ranking": [(r["model"], r["scores"]) for r in job["ranking"]], "ranked_by": job["ranked_by"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hub", type=Path, required=True)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--kind", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--gpus", default=None, help="start `hubtune worker --gpus GPUS` once instead")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    data = prepare(args.hub, args.rows)
    counts = [int(n) for n in args.workers.split(",")]
    results: dict[int, dict[str, Any]] = {}
    for count in counts:
        with tempfile.TemporaryDirectory(prefix="hubtune-fanout-") as scratch:
            env = {"HUBTUNE_MODEL_ROOTS": str(args.hub.resolve()), "OMP_NUM_THREADS": "1",
                   "HUBTUNE_LEASE_SECONDS": "60", "HUBTUNE_HEARTBEAT_SECONDS": "5",
                   "HUBTUNE_BOOTSTRAP_SAMPLES": "200"}
            stacks = _make_stack("sqlite", Path(scratch), **env) if args.kind == "sqlite" else \
                postgres_stack(Path(scratch), env)
            stack = next(stacks)
            try:
                results[count] = run_once(stack, args.hub.resolve(), data, count, args.gpus)
            finally:
                stacks.close()
        print(f"{count} worker(s): {results[count]['seconds']:.1f} s, {results[count]['workers_used']} scored",
              flush=True)
    base = results[counts[0]]
    print(f"\n{args.kind}, {len(MODELS)} candidates, {args.rows} BBC News rows, "
          f"{os.cpu_count()} cores ({platform.processor() or platform.machine()})")
    print("| worker processes | wall s | vs 1 worker | workers that scored | ranking identical |")
    print("|---|---|---|---|---|")
    for count, result in results.items():
        same = result["ranking"] == base["ranking"]
        print(f"| {count} | {result['seconds']:.1f} | {base['seconds'] / result['seconds']:.2f}x | "
              f"{result['workers_used']} | {'yes' if same else 'NO'} |")
    print("\nranking (1 worker):", ", ".join(name for name, _ in base["ranking"]))
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()

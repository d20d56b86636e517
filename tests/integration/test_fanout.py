"""One rank job over several workers (issue 20): every candidate is its own claim with its own lease, any worker
takes any candidate, a killed worker loses only its candidate, and the ranking is assembled once."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.integration.conftest import Stack
from tests.integration.faults import _descendants
from tests.integration.test_http_flow import register_hub, topic_csv, upload, wait_for
from tests.tiny_models import make_tiny_bert


def _client(stack: Stack) -> httpx.Client:
    key = stack.create_key("fanout")
    return httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _wait_until_ready(stack: Stack, workers: list, timeout: float = 120) -> None:
    """Each worker's pool child is forked: it consumes from here on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_descendants(worker.pid) for worker in workers):
            return
        time.sleep(0.2)
    raise AssertionError("workers did not start:\n" + stack.log_text())


def _database(stack: Stack):  # type: ignore[no-untyped-def]
    url = stack.env.get("HUBTUNE_DATABASE_URL") or f"sqlite:///{stack.home / 'hubtune.db'}"
    return create_engine(url.replace("postgresql://", "postgresql+psycopg://"))


def _pid(worker_name: str) -> int:
    return int(worker_name.split(":")[1])


def test_two_workers_share_one_rank_job_and_a_rerun_ranks_alike(stack: Stack, tiny_hub: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    client = _client(stack)
    hub = dict(tiny_hub, **{f"bert-{width}": make_tiny_bert(tmp_path / f"bert-{width}", hidden_size=width,
                                                            num_layers=2, seed=width) for width in (48, 96, 128)})
    ids = register_hub(client, hub)
    dataset = upload(client, topic_csv(400, words=40)).json()
    workers = [stack.start_worker(), stack.start_worker()]
    _wait_until_ready(stack, workers)
    spec = {"dataset_id": dataset["id"], "candidates": ids, "metrics": ["ridge_loo", "logme"]}

    job = wait_for(client, client.post("/v1/jobs", json=spec).json()["id"], stack)
    assert job["status"] == "succeeded", (job, stack.log_text())
    assert sorted(r["model_id"] for r in job["ranking"]) == sorted(ids)
    assert [r["rank"] for r in job["ranking"]] == list(range(1, len(ids) + 1))
    processes = {_pid(r["worker"]) for r in job["ranking"]}
    pool_children = {worker.pid: set(_descendants(worker.pid)) for worker in workers}
    assert all(any(pid in children for pid in processes) for children in pool_children.values()), \
        (processes, pool_children)  # both workers scored candidates of the one job
    assert job["verdict"]["top"] == job["ranking"][0]["model_id"]
    feature_map = client.get(f"/v1/jobs/{job['id']}/feature-map").json()
    assert len(feature_map["models"]) == len(ids)  # features read back from the cache for every candidate

    halving = client.post("/v1/jobs", json={**spec, "metrics": ["ridge_loo"],
                                            "successive_halving": {"initial_rows": 64, "confidence": 0.9}})
    halving = wait_for(client, halving.json()["id"], stack)
    assert halving["status"] == "succeeded", (halving, stack.log_text())
    engine = _database(stack)
    with engine.connect() as connection:
        rounds = connection.execute(text("SELECT step, model_id, worker, status FROM job_candidates WHERE job_id = "
                                         ":job"), {"job": halving["id"]}).all()
    engine.dispose()
    survivors = {r["index"]: set(r["survivors"]) for r in halving["ranking_summary"]["rounds"]}
    assert {int(row.step.rsplit("-", 1)[1]) for row in rounds} == set(survivors)  # every round fanned out
    for index, models in survivors.items():
        assert {row.model_id for row in rounds if row.step.endswith(f"-{index}")} == models
    assert all(row.status == "scored" for row in rounds)
    assert len({_pid(row.worker) for row in rounds}) == 2  # both workers extracted rounds' features

    stack.kill_worker(workers[1])  # the same job on one worker: from the feature cache, the same ranking
    again = wait_for(client, client.post("/v1/jobs", json=spec).json()["id"], stack)
    assert again["status"] == "succeeded", (again, stack.log_text())
    assert all(r["features_cached"] for r in again["ranking"])
    assert [(r["model_id"], r["scores"]) for r in again["ranking"]] == \
        [(r["model_id"], r["scores"]) for r in job["ranking"]]
    assert again["verdict"] == job["verdict"]


def test_a_killed_worker_loses_only_its_candidate(stack: Stack, tiny_hub: dict[str, Path], tmp_path: Path) -> None:
    """Worker A coordinates the job and scores the first slow model; worker B takes the second and is SIGKILLed
    mid-candidate. Only that candidate is scored again (after its lease runs out); the job's own attempt and
    every other candidate stay as they were."""
    if stack.kind != "postgres":
        pytest.skip("one stack kind is enough for the kill (the SQLite stack runs the share test)")
    client = _client(stack)
    slow = {f"slow-{seed}": make_tiny_bert(tmp_path / f"slow-{seed}", hidden_size=256, num_layers=4, seed=seed)
            for seed in (11, 12)}
    ids = register_hub(client, {**slow, **tiny_hub})
    dataset = upload(client, topic_csv(1200, words=120)).json()
    coordinator = stack.start_worker()
    _wait_until_ready(stack, [coordinator])
    job_id = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "candidates": ids}).json()["id"]
    victim = stack.start_worker()
    engine = _database(stack)
    deadline = time.monotonic() + 180
    taken = None
    while time.monotonic() < deadline and taken is None:
        with engine.connect() as connection:
            running = connection.execute(text("SELECT model_id, worker FROM job_candidates WHERE job_id = :job "
                                              "AND status = 'running'"), {"job": job_id}).all()
        taken = next((row for row in running if _pid(row.worker) in _descendants(victim.pid)), None)
        time.sleep(0.1)
    assert taken is not None, stack.log_text()
    stack.kill_worker(victim)  # most likely mid the second slow model: the coordinator is on the first

    job = wait_for(client, job_id, stack, timeout=300)
    assert job["status"] == "succeeded", (job, stack.log_text())
    assert job["attempts"] == 1  # the coordinator never lost the job
    entries = {r["model_id"]: r for r in job["ranking"]}
    assert set(entries) == set(ids) and all("error" not in r for r in entries.values())
    assert entries[taken.model_id]["attempts"] == 2
    assert _pid(entries[taken.model_id]["worker"]) != _pid(taken.worker)
    assert {r["attempts"] for model_id, r in entries.items() if model_id != taken.model_id} == {1}
    engine.dispose()


def test_a_tune_job_trains_its_targets_on_several_workers(stack: Stack, tiny_hub: dict[str, Path]) -> None:
    """Fine-tuning top_k targets is one run per target: each is a candidate any tune worker takes; the
    checkpoints are recorded once, with the job's final status, and each one downloads whole."""
    if stack.kind != "postgres":
        pytest.skip("one stack kind is enough (the SQLite stack runs the share test)")
    import hashlib

    client = _client(stack)
    ids = register_hub(client, tiny_hub)
    dataset = upload(client, topic_csv(120)).json()
    workers = [stack.start_worker(), stack.start_worker()]
    _wait_until_ready(stack, workers)
    tune = {"strategy": "finetune", "top_k": 3, "epochs": 2, "lr": 1e-3, "batch_size": 8, "max_length": 32,
            "seed": 0}
    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "candidates": ids, "tune": tune}).json()
    job = wait_for(client, job["id"], stack, timeout=300)
    assert job["status"] == "succeeded", (job, stack.log_text())
    tuned = job["tuning"]["models"]
    assert [t["model_id"] for t in tuned] == [r["model_id"] for r in job["ranking"]]  # the ranking's order
    assert all(t["metrics"]["accuracy"] is not None for t in tuned)
    processes = {_pid(t["worker"]) for t in tuned}
    assert all(any(pid in _descendants(w.pid) for pid in processes) for w in workers), processes
    checkpoints = client.get(f"/v1/jobs/{job['id']}/checkpoints").json()
    assert sorted(c["name"] for c in checkpoints) == sorted(t["checkpoint"] for t in tuned)
    for listing in checkpoints:
        url = f"/v1/jobs/{job['id']}/checkpoints/{listing['name']}/files/"
        for entry in listing["files"]:
            assert hashlib.sha256(client.get(url + entry["path"]).content).hexdigest() == entry["sha256"]

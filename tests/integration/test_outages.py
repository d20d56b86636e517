"""The full stack through PostgreSQL and Redis outages (issue 19, item 9), on private servers of its own that the
test stops, freezes (SIGSTOP) and thaws: the API answers 503 problem+json with Retry-After within its timeouts,
/healthz names the dependency that is down, a job accepted while the broker is down is sent once it is back, and
every job ends once."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.integration.conftest import Stack, free_port
from tests.integration.faults import PrivatePostgres, PrivateRedis
from tests.integration.test_http_flow import register_hub, topic_csv, upload

# The API's bound with its default timeouts: a frozen database costs the pool's quick ping (1 s) and one connect
# attempt (2 s); a frozen broker one send and one retry (2 s each at most); plus a loaded machine's slack.
BOUND = 6.0


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[PrivatePostgres, PrivateRedis]]:
    postgres = PrivatePostgres()
    broker = PrivateRedis(tmp_path / "redis")
    try:
        postgres.start()
        broker.start()
        yield postgres, broker
    finally:
        broker.stop()
        postgres.remove()


@pytest.fixture
def private_stack(servers: tuple[PrivatePostgres, PrivateRedis], tmp_path: Path) -> Iterator[Stack]:
    import os

    from tests.integration.conftest import REPO

    postgres, broker = servers
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBTUNE_")}
    env.update({
        "HUBTUNE_HOME": str(home), "HUBTUNE_DATABASE_URL": postgres.url, "HUBTUNE_BROKER_URL": broker.url,
        "HUBTUNE_AUTH": "required", "HUBTUNE_LEASE_SECONDS": "8", "HUBTUNE_HEARTBEAT_SECONDS": "0.5",
        "HUBTUNE_RECONCILE_SECONDS": "1", "HUBTUNE_BOOTSTRAP_SAMPLES": "30", "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
        "HUBTUNE_MODEL_ROOTS": str(tmp_path.parent),  # pytest's base folder: the tiny hub is below it
    })
    stack = Stack(kind="postgres", home=home, env=env, url=f"http://127.0.0.1:{free_port()}", cwd=cwd)
    try:
        stack.start_api()
        yield stack
    finally:
        stack.stop()


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def unavailable(response: httpx.Response, seconds: float) -> dict:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert int(response.headers["retry-after"]) > 0
    assert seconds < BOUND, f"503 after {seconds:.1f} s"
    return response.json()


def eventually(check: Callable[[], bool], timeout: float = 15) -> float:
    """Seconds until `check` held; fails after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if check():
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s")


def on_queue(broker: PrivateRedis, job_id: str, queue: str = "rank") -> bool:
    messages = redis.Redis.from_url(broker.url, socket_timeout=2).lrange(queue, 0, -1)
    return any(job_id.encode() in message for message in messages)


def test_outages_answer_503_in_bounded_time_and_recover(private_stack: Stack,
                                                        servers: tuple[PrivatePostgres, PrivateRedis]) -> None:
    postgres, broker = servers
    client = httpx.Client(base_url=private_stack.url, timeout=30,
                          headers={"Authorization": f"Bearer {private_stack.create_key('ops')}"})
    dataset = upload(client, topic_csv(12)).json()["id"]
    model = client.post("/v1/models", json={"source": "hf", "repo_id": "org/outage"}).json()["id"]
    body = {"dataset_id": dataset, "candidates": [model]}

    postgres.freeze()
    try:
        unavailable(*timed(lambda: client.get("/v1/jobs")))
        health = unavailable(*timed(lambda: client.get("/healthz")))
        assert health["checks"]["database"]["status"] == "down" and health["checks"]["broker"]["status"] == "ok"
        unavailable(*timed(lambda: client.post("/v1/jobs", json=body)))
    finally:
        postgres.thaw()
    eventually(lambda: client.get("/v1/jobs").status_code == 200)

    postgres.stop()
    unavailable(*timed(lambda: client.get("/v1/datasets")))
    postgres.start()
    eventually(lambda: client.get("/healthz").status_code == 200)

    broker.freeze()
    try:
        accepted, seconds = timed(lambda: client.post("/v1/jobs", json=body))
        assert accepted.status_code == 202 and seconds < BOUND, (accepted.text, seconds)
        assert accepted.json()["stage"] == "waiting for the broker"
        health = unavailable(*timed(lambda: client.get("/healthz")))
        assert health["checks"]["broker"]["status"] == "down" and health["checks"]["database"]["status"] == "ok"
    finally:
        broker.thaw()
    frozen_job = accepted.json()["id"]
    eventually(lambda: on_queue(broker, frozen_job))

    broker.stop()
    accepted, seconds = timed(lambda: client.post("/v1/jobs", json=body))
    assert accepted.status_code == 202 and seconds < BOUND, (accepted.text, seconds)
    stopped_job = accepted.json()["id"]
    broker.start()
    # sent at the reconciler's next pass (1 s here), not after requeue_queued_after_seconds (300 s)
    assert eventually(lambda: on_queue(broker, stopped_job), timeout=10) < 10
    assert client.get(f"/v1/jobs/{stopped_job}").json()["stage"] == "queued"
    assert client.get("/healthz").status_code == 200


@pytest.mark.slow
def test_jobs_end_once_through_outages_mid_job(private_stack: Stack, servers: tuple[PrivatePostgres, PrivateRedis],
                                               tiny_hub: dict[str, Path]) -> None:
    """A real worker ranks while PostgreSQL and Redis are frozen and stopped under it: every job succeeds once,
    with one ranking entry per candidate, and none is lost."""
    postgres, broker = servers
    client = httpx.Client(base_url=private_stack.url, timeout=30,
                          headers={"Authorization": f"Bearer {private_stack.create_key('ops')}"})
    models = register_hub(client, tiny_hub)
    dataset = upload(client, topic_csv(60)).json()["id"]
    private_stack.start_worker()
    jobs = [client.post("/v1/jobs", json={"dataset_id": dataset, "candidates": models}).json()["id"]
            for _ in range(2)]
    eventually(lambda: client.get(f"/v1/jobs/{jobs[0]}").json()["status"] == "running", timeout=120)

    for server in (postgres, broker):  # frozen mid-job, longer than the API's timeouts
        server.freeze()
        time.sleep(5)
        server.thaw()
        eventually(lambda: client.get("/healthz").status_code == 200)
    broker.stop()
    jobs.append(client.post("/v1/jobs", json={"dataset_id": dataset, "candidates": models}).json()["id"])
    time.sleep(2)
    broker.start()
    postgres.stop()
    time.sleep(2)
    postgres.start()

    def all_ended() -> bool:
        return all(client.get(f"/v1/jobs/{job}").json()["status"] in ("succeeded", "failed", "cancelled")
                   for job in jobs)

    eventually(all_ended, timeout=300)
    for job_id in jobs:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded", (job, private_stack.log_text())
        assert sorted(entry["rank"] for entry in job["ranking"]) == list(range(1, len(models) + 1))
        assert sorted(entry["model_id"] for entry in job["ranking"]) == sorted(models)
    listed = client.get("/v1/jobs").json()
    assert listed["total"] == len(jobs)

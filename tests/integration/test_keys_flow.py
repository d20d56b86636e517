"""Two user keys on a real stack (API and worker processes, both defaults): A tunes a model and ranks its own
checkpoint as a candidate through {"source": "checkpoint"}; B can neither register that checkpoint (by job or by
folder) nor see it, nor learn a server path from any response (issue 19, item 1, end to end)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Stack
from tests.integration.test_http_flow import register_hub, topic_csv, upload, wait_for


@pytest.mark.slow  # a real tune job, then a rank job: about a minute on two busy cores
def test_a_users_checkpoint_is_its_own_candidate_end_to_end(stack: Stack, tiny_hub: dict[str, Path]) -> None:
    def client(key: str) -> httpx.Client:
        return httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    admin = client(stack.create_key("ops", admin=True))
    alice, bob = client(stack.create_key("alice", admin=False)), client(stack.create_key("bob", admin=False))
    stack.start_worker()
    catalog = register_hub(admin, {"bert-32": tiny_hub["bert-32"]})
    dataset = upload(alice, topic_csv(90)).json()["id"]
    tune = {"strategy": "finetune", "top_k": 1, "epochs": 1, "lr": 1e-3, "batch_size": 16, "max_length": 32}
    tuned = wait_for(alice, alice.post("/v1/jobs", json={"dataset_id": dataset, "tune": tune}).json()["id"], stack,
                     timeout=300)
    assert tuned["status"] == "succeeded", (tuned, stack.log_text())
    (checkpoint,) = alice.get(f"/v1/jobs/{tuned['id']}/checkpoints").json()
    folder = stack.home / "artifacts" / "jobs" / tuned["id"] / "checkpoints" / checkpoint["name"]
    assert folder.is_dir()

    body = {"source": "checkpoint", "job_id": tuned["id"], "name": checkpoint["name"]}
    assert bob.post("/v1/models", json=body).status_code == 404
    assert bob.post("/v1/models", json={"source": "local", "path": str(folder)}).status_code == 403
    entry = alice.post("/v1/models", json=body)
    assert entry.status_code == 201, entry.text
    assert entry.json()["path"] is None and entry.json()["shared"] is False

    ranked = wait_for(alice, alice.post("/v1/jobs", json={"dataset_id": dataset, "candidates": [
        catalog[0], entry.json()["id"]]}).json()["id"], stack)
    assert ranked["status"] == "succeeded", (ranked, stack.log_text())
    scores = {r["model_id"]: r["scores"]["logme"] for r in ranked["ranking"]}
    assert scores[entry.json()["id"]] is not None and scores[catalog[0]] is not None

    bob_data = upload(bob, topic_csv(30)).json()["id"]
    bob_job = bob.post("/v1/jobs", json={"dataset_id": bob_data}).json()
    assert bob_job["candidates"] == catalog
    for response in (bob.get("/v1/models"), alice.get("/v1/models"), alice.get(f"/v1/jobs/{tuned['id']}")):
        assert str(stack.home) not in response.text and str(tiny_hub["bert-32"]) not in response.text
    assert alice.get(f"/v1/jobs/{tuned['id']}").json()["tuning"]["models"][0]["checkpoint_dir"] == "<server path>"

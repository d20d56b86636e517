"""Rank then tune through HTTP with a real worker: checkpoints download (with Range) and load offline; a worker
killed mid-training resumes from its saved state."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Stack
from tests.integration.test_http_flow import register_hub, topic_csv, upload, wait_for


@pytest.fixture
def client_and_dataset(stack: Stack, tiny_hub: dict[str, Path]):
    key = stack.create_key("tuner")
    client = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    dataset = upload(client, topic_csv(120)).json()
    ids = register_hub(client, tiny_hub)
    return client, dataset, ids


def test_btuning_and_finetune_checkpoints(stack: Stack, client_and_dataset, tmp_path: Path) -> None:
    client, dataset, ids = client_and_dataset
    stack.start_worker()
    bad = client.post("/v1/jobs", json={"dataset_id": dataset["id"],
                                        "tune": {"regularizer": {"name": "l2sp", "params": {"alpha": -1}}}})
    assert bad.status_code == 422 and bad.json()["field"] == "tune.regularizer.params.alpha", bad.text
    bad = client.post("/v1/jobs", json={"dataset_id": dataset["id"],
                                        "tune": {"strategy": "btuning", "tradeoff": "big"}})
    assert bad.status_code == 422 and bad.json()["field"] == "tune.tradeoff" and "auto" in bad.json()["detail"]
    # the tradeoff chosen between two values by trial runs on the training split
    tune = {"strategy": "btuning", "top_k": 2, "epochs": 1, "lr": 1e-3, "batch_size": 16, "max_length": 32,
            "tradeoff": [0.1, 1.0], "seed": 0}
    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "tune": tune}).json()
    job = wait_for(client, job["id"], stack, timeout=300)
    assert job["status"] == "succeeded", (job, stack.log_text())
    assert len(job["ranking"]) == 3
    tuned = job["tuning"]["models"]
    # B-Tuning's target is the best by LogME (its teachers are weighted by LogME), whatever orders the ranking
    by_logme = max(job["ranking"], key=lambda r: r["scores"]["logme"])
    assert len(tuned) == 1 and tuned[0]["model_id"] == by_logme["model_id"]
    metrics = tuned[0]["metrics"]
    for name in ("accuracy", "macro_f1", "ece", "val_loss"):
        assert metrics[name] is not None
    assert tuned[0]["curve"] and tuned[0]["wall_seconds"] > 0
    selection = tuned[0]["details"]["tradeoff_selection"]
    assert [t["tradeoff"] for t in selection["trials"]] == [0.1, 1.0]
    assert selection["chosen"] in (0.1, 1.0) and tuned[0]["config"]["tradeoff"] == selection["chosen"]
    assert sum(selection["rows"].values()) == 96  # the training split (80% of 120 rows); validation rows unseen

    checkpoints = client.get(f"/v1/jobs/{job['id']}/checkpoints").json()
    assert len(checkpoints) == 1
    listing = checkpoints[0]
    paths = {f["path"] for f in listing["files"]}
    assert {"config.json", "model.safetensors", "README.md"} <= paths
    url = f"/v1/jobs/{job['id']}/checkpoints/{listing['name']}/files/"
    target = tmp_path / "ckpt"
    target.mkdir()
    for entry in listing["files"]:
        body = client.get(url + entry["path"]).content
        assert hashlib.sha256(body).hexdigest() == entry["sha256"] and len(body) == entry["size"]
        (target / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
        (target / entry["path"]).write_bytes(body)
    partial = client.get(url + "config.json", headers={"Range": "bytes=0-9"})
    assert partial.status_code == 206 and len(partial.content) == 10
    assert client.get(url + "../../../etc/passwd").status_code == 404

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert model.config.id2label == {0: "business", 1: "sport", 2: "tech"}
    logits = model(**tokenizer(["the match was won by the team"], return_tensors="pt")).logits
    assert logits.shape == (1, 3)
    card = (target / "README.md").read_text()
    assert dataset["sha256"] in card and "btuning" in card

    # CLI download verifies the same files.
    done = stack.cli("jobs", "download", job["id"], "--out", str(tmp_path / "cli"),
                     key=client.headers["Authorization"][7:])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cli" / listing["name"] / "model.safetensors").is_file()


def test_killed_worker_resumes_training(stack: Stack, client_and_dataset) -> None:
    client, dataset, ids = client_and_dataset
    worker = stack.start_worker()
    tune = {"strategy": "finetune", "top_k": 1, "epochs": 8, "lr": 1e-3, "batch_size": 4, "max_length": 64,
            "regularizer": {"name": "l2sp"}}
    job_id = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "candidates": ids[:1],
                                           "tune": tune}).json()["id"]
    state_dir = stack.home / "artifacts" / "jobs" / job_id / "train-state"
    deadline = time.time() + 240
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        saved = list(state_dir.rglob("state.pt")) if state_dir.exists() else []
        if job["stage"].startswith("tuning") and saved:
            break
        assert job["status"] in ("queued", "running"), (job, stack.log_text())
        time.sleep(0.2)
    assert saved, stack.log_text()
    stack.kill_worker(worker)
    stack.start_worker()
    job = wait_for(client, job_id, stack, timeout=300)
    assert job["status"] == "succeeded", (job, stack.log_text())
    result = job["tuning"]["models"][0]
    assert result["resumed_from_step"] > 0
    assert result["steps"] == result["total_steps"]
    assert len(client.get(f"/v1/jobs/{job_id}/checkpoints").json()) == 1


def test_cancel_during_training_leaves_no_checkpoint(stack: Stack, client_and_dataset) -> None:
    client, dataset, ids = client_and_dataset
    stack.start_worker()
    tune = {"epochs": 20, "batch_size": 2, "max_length": 64, "lr": 1e-4}
    job_id = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "candidates": ids[:1],
                                           "tune": tune}).json()["id"]
    deadline = time.time() + 240
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["stage"].startswith("tuning") and job["progress"] > 0:
            break
        time.sleep(0.2)
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    job = wait_for(client, job_id, stack, timeout=120)
    assert job["status"] == "cancelled", job
    assert client.get(f"/v1/jobs/{job_id}/checkpoints").json() == []
    checkpoints = stack.home / "artifacts" / "jobs" / job_id / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())


def _gibberish_csv(rows: int) -> bytes:
    """Rows of words no topic uses: out of distribution for topic_csv's classes."""
    import random

    rng = random.Random(7)
    vocab = "violin glacier quantum pepper orbit saddle lantern mosaic tundra velvet".split()
    lines = ["text,label"] + [f"{' '.join(rng.choice(vocab) for _ in range(12))},x{i % 2}" for i in range(rows)]
    return "\n".join(lines).encode()


def test_sngp_head_with_an_ood_dataset(stack: Stack, client_and_dataset, tmp_path: Path) -> None:
    client, dataset, ids = client_and_dataset
    stack.start_worker()
    ood = upload(client, _gibberish_csv(40), name="ood.csv").json()
    numbers = "\n".join(["text,label"] + [f"row {i} of numbers,{i * 0.5}" for i in range(30)]).encode()
    regression = upload(client, numbers, name="reg.csv", task="regression").json()
    other_key = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.create_key('other')}"})
    foreign = upload(other_key, _gibberish_csv(20), name="theirs.csv").json()

    def refused(body: dict, status: int, field: str) -> None:
        answer = client.post("/v1/jobs", json=body)
        assert answer.status_code == status and answer.json()["field"] == field, answer.text

    refused({"dataset_id": regression["id"], "candidates": ids[:1], "tune": {"head": "sngp"}}, 422, "tune.head")
    refused({"dataset_id": dataset["id"], "tune": {"sngp": {"ridge": 2}}}, 422, "tune.sngp")
    refused({"dataset_id": dataset["id"], "tune": {"head": "sngp", "sngp": {"ridge": -1}}}, 422, "tune.sngp.ridge")
    refused({"dataset_id": dataset["id"], "tune": {"ood_dataset_id": foreign["id"]}}, 404, "tune.ood_dataset_id")
    refused({"dataset_id": dataset["id"], "tune": {"ood_dataset_id": dataset["id"]}}, 422, "tune.ood_dataset_id")

    tune = {"head": "sngp", "ood_dataset_id": ood["id"], "epochs": 2, "lr": 1e-3, "batch_size": 16,
            "max_length": 32}
    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "candidates": ids[:1], "tune": tune}).json()
    job = wait_for(client, job["id"], stack, timeout=300)
    assert job["status"] == "succeeded", (job, stack.log_text())
    tuned = job["tuning"]["models"][0]
    assert tuned["checkpoint"].endswith("-finetune-sngp")
    assert tuned["metrics"]["ece"] is not None and 0 <= tuned["metrics"]["ood_auroc"] <= 1
    assert tuned["details"]["ood_rows"] == 24  # capped at the 24 validation rows (20% of 120)
    assert all(v <= 0.95 * 1.001 for v in tuned["details"]["sngp"]["spectral_norms"].values())

    listing = client.get(f"/v1/jobs/{job['id']}/checkpoints").json()[0]
    target = tmp_path / "sngp"
    for entry in listing["files"]:
        (target / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
        body = client.get(f"/v1/jobs/{job['id']}/checkpoints/{listing['name']}/files/{entry['path']}").content
        (target / entry["path"]).write_bytes(body)
    from transformers import AutoTokenizer

    from workers.tuning.sngp import load_sngp_classifier, predict_proba

    model, tokenizer = load_sngp_classifier(target), AutoTokenizer.from_pretrained(target)
    probs = predict_proba(model, **tokenizer(["the match was won by the team"], return_tensors="pt"))
    assert probs.shape == (1, 3) and abs(float(probs.sum()) - 1) < 1e-5

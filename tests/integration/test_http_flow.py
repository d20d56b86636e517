"""Through HTTP against a real API process and a real Celery worker, on both defaults."""

from __future__ import annotations

import csv
import io
import json
import math
import random
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.integration.conftest import Stack
from tests.tiny_models import make_tiny_mobilenet, make_tiny_vit

TOPICS = {
    "business": "market shares bank profit company economy growth price",
    "sport": "game match team win won play player season goal",
    "tech": "phone software computer internet technology users mobile digital network data",
}


def topic_csv(rows: int, seed: int = 0, words: int = 12) -> bytes:
    rng = random.Random(seed)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["text", "label"])
    for i in range(rows):
        label = list(TOPICS)[i % len(TOPICS)]
        vocab = TOPICS[label].split() + "the a of and to in".split()
        writer.writerow([" ".join(rng.choice(vocab) for _ in range(words)), label])
    return out.getvalue().encode()


def upload(client: httpx.Client, content: bytes, name: str = "data.csv", **form: str | None) -> httpx.Response:
    """POST a dataset; a form field given as None is not sent."""
    data = {"task": "classification", "text_column": "text", "label_column": "label", **form}
    data = {k: v for k, v in data.items() if v is not None}
    return client.post("/v1/datasets", files={"file": (name, content)}, data=data)


def register_hub(client: httpx.Client, tiny_hub: dict[str, Path]) -> list[str]:
    ids = []
    for name, path in tiny_hub.items():
        response = client.post("/v1/models", json={"source": "local", "path": str(path), "name": name})
        assert response.status_code in (200, 201), response.text
        ids.append(response.json()["id"])
    return ids


def wait_for(client: httpx.Client, job_id: str, stack: Stack, timeout: float = 240,
             until: tuple[str, ...] = ("succeeded", "failed", "cancelled")) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} stuck at {job['status']}/{job['stage']}\n{stack.log_text()}")


def test_rank_flow_and_errors(stack: Stack, tiny_hub: dict[str, Path], tmp_path: Path) -> None:
    key = stack.create_key("alice")
    other = stack.create_key("bob")
    stack.start_worker()
    alice = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    bob = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {other}"}, timeout=30)

    assert httpx.get(f"{stack.url}/v1/datasets").status_code == 401  # keys required on this stack

    created = upload(alice, topic_csv(90))
    assert created.status_code == 201, created.text
    dataset = created.json()
    assert dataset["rows"] == 90 and dataset["label_names"] == ["business", "sport", "tech"]
    assert dataset["class_counts"] == {"business": 30, "sport": 30, "tech": 30}
    assert len(dataset["sha256"]) == 64

    model_ids = register_hub(alice, tiny_hub)
    assert {m["name"] for m in alice.get("/v1/models").json()["items"]} >= set(tiny_hub)

    submitted = alice.post("/v1/jobs", json={"dataset_id": dataset["id"], "metrics": ["logme", "hscore", "ridge_loo"]})
    assert submitted.status_code == 202, submitted.text
    assert submitted.headers["location"] == f"/v1/jobs/{submitted.json()['id']}"
    job = wait_for(alice, submitted.json()["id"], stack)
    assert job["status"] == "succeeded", (job, stack.log_text())
    ranking = job["ranking"]
    assert sorted(r["rank"] for r in ranking) == [1, 2, 3]
    assert {r["model_id"] for r in ranking} == set(model_ids)
    logmes = [r["scores"]["logme"] for r in ranking]
    assert logmes == sorted(logmes, reverse=True)
    for entry in ranking:
        low, high = entry["intervals"]["logme"]
        assert low <= high
        assert isinstance(entry["beats_prior"], bool)
        low, high = entry["intervals"]["ridge_loo"]  # a leave-one-out accuracy with its bootstrap interval
        assert 0.0 <= low <= entry["scores"]["ridge_loo"] <= high <= 1.0
    assert 0.0 <= ranking[0]["p_better_than_next"]["logme"] <= 1.0
    # Every finished job says what ordered it and what the data let it conclude.
    assert job["ranked_by"] == {"estimator": "logme", "features": {"pooling": "mean", "layers": "last",
                                                                  "transform": "none"}}
    verdict = job["verdict"]
    assert verdict["top"] == ranking[0]["model_id"] and isinstance(verdict["confident"], bool)
    assert set(verdict["indistinguishable_from_top"]) <= set(model_ids) - {verdict["top"]}
    assert verdict["below_prior"] == [r["model_id"] for r in ranking if not r["beats_prior"]]
    assert verdict["static_baseline"]["by"] == "parameters" and verdict["static_baseline"]["available"]
    assert all(isinstance(r["parameters"], int) and r["parameters"] > 0 for r in ranking)
    assert verdict["summary"].startswith(ranking[0]["model"])
    # All local state lives in HUBTUNE_HOME (the filesystem broker's exchange tables included), none in the cwd.
    assert stack.cwd is not None and list(stack.cwd.iterdir()) == []
    if stack.kind == "sqlite":
        assert (stack.home / "broker" / "control" / "rank.exchange").exists()

    # Another key sees none of it.
    assert bob.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert bob.get(f"/v1/datasets/{dataset['id']}").status_code == 404
    assert bob.get("/v1/jobs").json()["total"] == 0
    assert bob.post("/v1/jobs", json={"dataset_id": dataset["id"]}).status_code == 404

    # A second job on the same data and models reuses the cached features: no forward pass.
    again = wait_for(alice, alice.post("/v1/jobs", json={"dataset_id": dataset["id"]}).json()["id"], stack)
    assert again["status"] == "succeeded"
    assert all(r["features_cached"] and r["feature_seconds"] == 0.0 for r in again["ranking"])
    assert alice.get("/v1/jobs", params={"limit": 1}).json()["total"] == 2
    # One file uploaded twice, ranking another text column: other examples, so other features, not the cached ones
    # of the first upload (the cache was keyed by the file's sha256 and returned the title's features for the body).
    lines = topic_csv(60).decode().splitlines()[1:]
    two_columns = "title,body,label\n" + "".join(
        f"{line.rsplit(',', 1)[0][:20]},{line.rsplit(',', 1)[0]},{line.rsplit(',', 1)[1]}\n" for line in lines)
    by_column = {}
    for column in ("title", "body"):
        column_set = upload(alice, two_columns.encode(), text_column=column)
        assert column_set.status_code == 201, column_set.text
        column_job = wait_for(alice, alice.post("/v1/jobs", json={"dataset_id": column_set.json()["id"]}
                                                ).json()["id"], stack)
        assert column_job["status"] == "succeeded", (column_job, stack.log_text())
        by_column[column] = {r["model_id"]: r for r in column_job["ranking"]}
    assert not any(r["features_cached"] for r in by_column["body"].values())
    assert all(abs(r["scores"]["logme"] - by_column["title"][m]["scores"]["logme"]) > 1e-6
               for m, r in by_column["body"].items())
    # pooling="head" ranks other features (the token a classification head reads): computed anew, scored differently
    head = wait_for(alice, alice.post("/v1/jobs", json={"dataset_id": dataset["id"], "pooling": "head"}).json()["id"],
                    stack)
    assert head["status"] == "succeeded" and head["options"]["pooling"] == "head"
    assert not any(r["features_cached"] for r in head["ranking"])
    mean_scores = {r["model_id"]: r["scores"]["logme"] for r in again["ranking"]}
    assert any(abs(r["scores"]["logme"] - mean_scores[r["model_id"]]) > 1e-6 for r in head["ranking"])
    bad_pooling = alice.post("/v1/jobs", json={"dataset_id": dataset["id"], "pooling": "max"})
    assert bad_pooling.status_code == 422 and bad_pooling.json()["field"] == "pooling"
    # The mean of every layer, from the cache the first job filled: no forward pass. No metrics named: the
    # default (service.contract.DEFAULT_METRICS) ranks by ridge_loo and shows LogME beside it.
    layered = wait_for(alice, alice.post("/v1/jobs", json={"dataset_id": dataset["id"], "layers": "all"}).json()["id"],
                       stack)
    assert layered["status"] == "succeeded", (layered, stack.log_text())
    assert layered["ranked_by"] == {"estimator": "ridge_loo", "features": {"pooling": "mean", "layers": "all",
                                                                           "transform": "none"}}
    assert layered["metrics"] == ["ridge_loo", "logme"] and "logme" in layered["ranking"][0]["scores"]
    assert all(r["features_cached"] for r in layered["ranking"])
    bad_layers = alice.post("/v1/jobs", json={"dataset_id": dataset["id"], "layers": "first"})
    assert bad_layers.status_code == 422 and bad_layers.json()["field"] == "layers"
    # SoftDecay of the ranked rows' features: from the cache (no forward pass), other scores, named in ranked_by.
    decayed = wait_for(alice, alice.post("/v1/jobs", json={"dataset_id": dataset["id"],
                                                           "feature_transform": "softdecay"}).json()["id"], stack)
    assert decayed["status"] == "succeeded", (decayed, stack.log_text())
    assert decayed["ranked_by"]["features"]["transform"] == {"name": "softdecay", "alpha": -0.6}
    assert decayed["options"]["feature_transform"] == "softdecay" and decayed["options"]["softdecay_alpha"] == -0.6
    assert all(r["features_cached"] and r["feature_seconds"] == 0.0 for r in decayed["ranking"])
    plain = {r["model_id"]: r["scores"] for r in again["ranking"]}
    assert all(abs(r["scores"]["logme"] - plain[r["model_id"]]["logme"]) > 1e-6 for r in decayed["ranking"])
    for bad, field in (({"feature_transform": "whiten"}, "feature_transform"),
                       ({"feature_transform": "softdecay", "softdecay_alpha": -1.0}, "softdecay_alpha"),
                       ({"softdecay_alpha": -0.3}, "softdecay_alpha"),
                       ({"tune": {"softdecay": {"alpha": 0.5}}}, "tune.softdecay.alpha")):
        refused = alice.post("/v1/jobs", json={"dataset_id": dataset["id"], **bad})
        assert refused.status_code == 422 and refused.json()["field"] == field, (bad, refused.text)
    # Successive halving: nested samples, one metric, the rounds recorded on the job.
    halving = alice.post("/v1/jobs", json={"dataset_id": dataset["id"], "metrics": ["logme"],
                                           "successive_halving": {"initial_rows": 30, "confidence": 0.9}})
    assert halving.status_code == 202, halving.text
    halved = wait_for(alice, halving.json()["id"], stack)
    assert halved["status"] == "succeeded", (halved, stack.log_text())
    assert sorted(r["rank"] for r in halved["ranking"]) == [1, 2, 3]
    summary = halved["ranking_summary"]
    assert summary["mode"] == "successive_halving" and summary["rounds"][0]["rows"] == 30
    assert summary["total_rows"] == 90
    assert halved["verdict"]["top"] == halved["ranking"][0]["model_id"] and halved["ranked_by"]["estimator"] == "logme"
    halved_decayed = wait_for(alice, alice.post("/v1/jobs", json={
        "dataset_id": dataset["id"], "metrics": ["logme"], "feature_transform": "softdecay", "softdecay_alpha": -0.3,
        "successive_halving": {"initial_rows": 30, "confidence": 0.9}}).json()["id"], stack)
    assert halved_decayed["status"] == "succeeded", (halved_decayed, stack.log_text())
    assert halved_decayed["ranked_by"]["features"]["transform"] == {"name": "softdecay", "alpha": -0.3}
    first_round = {m: v for m, v in summary["rounds"][0]["scores"].items() if v is not None}
    assert any(abs(v - first_round[m]) > 1e-6 for m, v in halved_decayed["ranking_summary"]["rounds"][0]["scores"]
               .items() if m in first_round and v is not None)
    two_metrics = alice.post("/v1/jobs", json={"dataset_id": dataset["id"], "metrics": ["logme", "hscore"],
                                               "successive_halving": {}})
    assert two_metrics.status_code == 422 and two_metrics.json()["field"] == "metrics"

    # Bad input: problem+json naming the field or row; nothing half-written.
    before = sorted(p.name for p in (stack.home / "artifacts" / "datasets").iterdir())
    cases = [
        (upload(alice, topic_csv(10), label_column="category"), 422, "label_column"),
        (upload(alice, b"text,label\nhello,a\nworld,a\n"), 422, None),
        (upload(alice, b""), 422, "file"),
        (upload(alice, b"text,label\nok,a\ncaf\xe9,b\n"), 422, None),
        (upload(alice, b"\x00\x01binary", name="data.bin"), 415, "file"),
        (upload(alice, topic_csv(10), task="ranking"), 422, "task"),
    ]
    for response, status, field in cases:
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        body = response.json()
        assert body["status"] == status and body["title"]
        if field:
            assert body["field"] == field
    assert cases[3][0].json()["row"] == 2  # the row with the latin-1 byte
    bad_regression = upload(alice, b"text,label\na,1.5\nb,abc\n", task="regression")
    assert bad_regression.status_code == 422 and bad_regression.json()["row"] == 2
    assert sorted(p.name for p in (stack.home / "artifacts" / "datasets").iterdir()) == before
    assert alice.get("/v1/datasets").json()["total"] == 3

    bad_job = alice.post("/v1/jobs", json={"dataset_id": dataset["id"], "metrics": ["logme", "accuracy"]})
    assert bad_job.status_code == 422 and bad_job.json()["field"] == "metrics[1]"
    bad_tune = alice.post("/v1/jobs", json={"dataset_id": dataset["id"], "tune": {"epochs": 0}})
    assert bad_tune.status_code == 422 and bad_tune.json()["field"] == "tune.epochs"

    # Regression: targets far from zero are standardised before scoring (LogME fits no bias), so the label-mean
    # baseline is that of a unit-variance target, about -(1 + log 2 pi)/2 = -1.419, whatever the offset.
    reg_rows = [f"{' '.join(['word'] * (3 + i % 7))} {i},{1000 + 25 * (i % 7) + (i % 3)}" for i in range(60)]
    reg = upload(alice, ("text,label\n" + "\n".join(reg_rows) + "\n").encode(), task="regression")
    assert reg.status_code == 201, reg.text
    reg_job = wait_for(alice, alice.post("/v1/jobs", json={"dataset_id": reg.json()["id"]}).json()["id"], stack)
    assert reg_job["status"] == "succeeded", (reg_job, stack.log_text())
    assert all(-1.5 < r["logme_prior_only"] < -1.41 for r in reg_job["ranking"])
    assert all(math.isfinite(r["scores"]["logme"]) for r in reg_job["ranking"])
    # B-Tuning distils regression too: the teachers' LogME predictions of the standardised target.
    reg_tune = {"strategy": "btuning", "top_k": 2, "epochs": 1, "lr": 1e-3, "batch_size": 16, "max_length": 32}
    reg_tuned = wait_for(alice, alice.post("/v1/jobs", json={"dataset_id": reg.json()["id"], "tune": reg_tune}
                                           ).json()["id"], stack)
    assert reg_tuned["status"] == "succeeded", (reg_tuned, stack.log_text())
    (student,) = reg_tuned["tuning"]["models"]
    assert math.isfinite(student["metrics"]["rmse"]) and len(student["details"]["btuning"]["teachers"]) == 2
    # the default tradeoff is chosen by trial runs, judged here by the held-out squared error
    selection = student["details"]["tradeoff_selection"]
    tried = [t["tradeoff"] for t in selection["trials"]]
    assert tried[:4] == [0.01, 0.1, 1.0, 10.0] and tried[4:] == selection["extended"]  # 100, 1000 if 10 won
    assert selection["extended"] == [100.0, 1000.0][:len(selection["extended"])]
    assert all(math.isfinite(t["rmse"]) and math.isfinite(t["val_loss"]) for t in selection["trials"])
    assert student["config"]["tradeoff"] == selection["chosen"] and selection["metric"] == "rmse"

    # Catalog: an image model is recorded but is never a candidate of a text job; a text model needs its tokenizer.
    vision = make_tiny_vit(tmp_path / "vision")
    image_model = alice.post("/v1/models", json={"source": "local", "path": str(vision)})
    assert image_model.status_code == 201 and image_model.json()["modality"] == "image", image_model.text
    refused = alice.post("/v1/jobs", json={"dataset_id": dataset["id"], "candidates": [image_model.json()["id"]]})
    assert refused.status_code == 422 and refused.json()["field"] == "candidates[0]"
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10, "hidden_size": 8}))
    no_tokenizer = alice.post("/v1/models", json={"source": "local", "path": str(bare)})
    assert no_tokenizer.status_code == 422 and no_tokenizer.json()["title"] == "no tokenizer"
    assert no_tokenizer.json()["field"] == "path"


def test_text_pair_flow(stack: Stack, tiny_hub: dict[str, Path]) -> None:
    """Pairs (do the two texts share a topic?) uploaded with text_pair_column: ranked and B-Tuned as pairs."""
    stack.start_worker()
    client = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.create_key('pairs')}"},
                          timeout=30)
    rng = random.Random(0)
    rows = []
    for _ in range(72):
        first, second = rng.choice(list(TOPICS)), rng.choice(list(TOPICS))
        rows.append({"question": " ".join(rng.choice(TOPICS[first].split()) for _ in range(6)),
                     "passage": " ".join(rng.choice(TOPICS[second].split()) for _ in range(9)),
                     "same": "yes" if first == second else "no"})
    content = "".join(json.dumps(r) + "\n" for r in rows).encode()
    created = upload(client, content, name="pairs.jsonl", text_column="question", text_pair_column="passage",
                     label_column="same")
    assert created.status_code == 201, created.text
    dataset = created.json()
    assert dataset["text_pair_column"] == "passage" and dataset["text_column"] == "question"
    assert client.get(f"/v1/datasets/{dataset['id']}").json()["text_pair_column"] == "passage"
    missing = upload(client, content, name="pairs.jsonl", text_column="question", text_pair_column="answer",
                     label_column="same")
    assert missing.status_code == 422 and missing.json()["field"] == "text_pair_column"
    register_hub(client, tiny_hub)
    tune = {"strategy": "btuning", "top_k": 2, "epochs": 1, "lr": 1e-3, "batch_size": 16, "max_length": 32,
            "tradeoff": 1.0}
    job = wait_for(client, client.post("/v1/jobs", json={"dataset_id": dataset["id"], "metrics": ["logme", "ridge_loo"],
                                                         "tune": tune}).json()["id"], stack)
    assert job["status"] == "succeeded", (job, stack.log_text())
    assert len(job["ranking"]) == 3 and all(math.isfinite(r["scores"]["logme"]) for r in job["ranking"])
    (student,) = job["tuning"]["models"]
    assert student["metrics"]["accuracy"] is not None and len(student["details"]["btuning"]["teachers"]) == 2
    (checkpoint,) = client.get(f"/v1/jobs/{job['id']}/checkpoints").json()
    card = client.get(f"/v1/jobs/{job['id']}/checkpoints/{checkpoint['name']}/files/README.md").text
    assert "tokenizer(text, text_pair)" in card and '"text_pair": "passage"' in card


def test_table_flow(stack: Stack, tiny_hub: dict[str, Path]) -> None:
    """A table uploaded with feature_columns ranks and tunes as the text of its rows' sentences (LIFT)."""
    stack.start_worker()
    client = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.create_key('tables')}"},
                          timeout=30)
    rng = random.Random(0)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["width", "colour", "city", "kind"])
    for _ in range(60):
        kind = rng.choice(["small", "large"])
        width = round(rng.gauss(2 if kind == "small" else 5, 1), 2)
        writer.writerow([width, rng.choice(["red", "blue"]), rng.choice(["Paris, FR", "Oslo, NO"]), kind])
    created = upload(client, out.getvalue().encode(), name="shapes.csv", text_column=None,
                     feature_columns="width, colour, city", label_column="kind")
    assert created.status_code == 201, created.text
    dataset = created.json()
    assert dataset["feature_columns"] == ["width", "colour", "city"]
    assert all(s.startswith("width is ") and 'city is "' in s for s in dataset["serialization"]["examples"])
    register_hub(client, tiny_hub)
    tune = {"strategy": "finetune", "top_k": 1, "epochs": 1, "lr": 1e-3, "batch_size": 16, "max_length": 32}
    job = wait_for(client, client.post("/v1/jobs", json={"dataset_id": dataset["id"], "tune": tune}).json()["id"],
                   stack)
    assert job["status"] == "succeeded", (job, stack.log_text())
    assert len(job["ranking"]) == 3 and all(math.isfinite(r["scores"]["logme"]) for r in job["ranking"])
    (checkpoint,) = client.get(f"/v1/jobs/{job['id']}/checkpoints").json()
    card = client.get(f"/v1/jobs/{job['id']}/checkpoints/{checkpoint['name']}/files/README.md").text
    assert "written as sentences (LIFT) from the columns `width, colour, city`" in card


def class_folder_zip(per_class: int, seed: int = 0, broken: str | None = None) -> bytes:
    """Three colour classes of noisy 32×32 PNGs, one folder per class, inside a top folder (as zipping a folder
    gives), with the junk a Mac adds; `broken` names a member written truncated."""
    import zipfile

    from PIL import Image

    rng = np.random.default_rng(seed)
    tints = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("__MACOSX/shapes/._red", b"\0")
        for label, tint in tints.items():
            for i in range(per_class):
                pixels = np.clip(np.array(tint) + rng.normal(0, 60, size=(32, 32, 3)), 0, 255).astype(np.uint8)
                png = io.BytesIO()
                Image.fromarray(pixels).save(png, format="PNG")
                name = f"shapes/{label}/{i:03d}.png"
                archive.writestr(name, png.getvalue()[:50] if name == broken else png.getvalue())
    return out.getvalue()


def test_image_rank_flow(stack: Stack, tiny_hub: dict[str, Path], tmp_path: Path) -> None:
    """A zip of class folders ranks the image models only; LEEP reads a ViT classifier's own head."""
    key = stack.create_key("images")
    stack.start_worker()
    client = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    register_hub(client, tiny_hub)  # text models: never candidates of an image job
    image_hub = {"vit-head": make_tiny_vit(tmp_path / "vit-head", num_labels=5, seed=4),
                 "mobilenet": make_tiny_mobilenet(tmp_path / "mobilenet", seed=5)}
    image_ids = register_hub(client, image_hub)
    assert all(m["modality"] == "image" for m in client.get("/v1/models").json()["items"] if m["id"] in image_ids)

    broken = client.post("/v1/datasets", data={"task": "classification"},
                         files={"file": ("shapes.zip", class_folder_zip(4, broken="shapes/green/002.png"))})
    assert broken.status_code == 422, broken.text
    assert (broken.json()["title"], broken.json()["path"], broken.json()["row"]) == ("unreadable image",
                                                                                     "green/002.png", 7)
    assert list((stack.home / "artifacts" / "datasets").iterdir()) == []  # nothing half-written

    created = client.post("/v1/datasets", files={"file": ("shapes.zip", class_folder_zip(12))},
                          data={"task": "classification"})
    assert created.status_code == 201, created.text
    dataset = created.json()
    assert (dataset["modality"], dataset["format"], dataset["rows"]) == ("image", "zip", 36)
    assert dataset["label_names"] == ["blue", "green", "red"] and dataset["class_counts"]["red"] == 12
    assert dataset["text_column"] is None and dataset["label_column"] is None and dataset["image_column"] is None

    text_model = client.get("/v1/models").json()["items"][0]
    layered = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "layers": "all"})
    assert layered.status_code == 422 and layered.json()["field"] == "layers"
    wrong = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "candidates": [text_model["id"]]})
    assert wrong.status_code == 422 and wrong.json()["field"] == "candidates[0]", wrong.text

    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "metrics": ["logme", "leep", "ridge_loo"]})
    assert job.status_code == 202, job.text
    assert sorted(job.json()["candidates"]) == sorted(image_ids)
    done = wait_for(client, job.json()["id"], stack)
    assert done["status"] == "succeeded", (done, stack.log_text())
    assert done["ranked_by"]["features"]["layers"] == "last"  # image models: the last layer by default
    ranking = {r["model"]: r for r in done["ranking"]}
    assert set(ranking) == set(image_hub)
    assert ranking["vit-head"]["scores"]["leep"] is not None and ranking["mobilenet"]["scores"]["leep"] is None
    assert ranking["mobilenet"]["feature_dim"] == 1280 and ranking["vit-head"]["feature_dim"] == 32
    for entry in ranking.values():
        assert math.isfinite(entry["scores"]["logme"]) and 0.0 <= entry["scores"]["ridge_loo"] <= 1.0
        low, high = entry["intervals"]["logme"]
        assert low <= entry["scores"]["logme"] <= high

    # "head" pooling: what each architecture's image classifier reads (for the headless MobileNetV2, through a
    # classifier built around it in the worker): its pooled 1280 channels, and the ViT's [CLS].
    headed = wait_for(client, client.post("/v1/jobs", json={"dataset_id": dataset["id"], "pooling": "head"}
                                          ).json()["id"], stack)
    assert headed["status"] == "succeeded", (headed, stack.log_text())
    assert {r["model"]: r["feature_dim"] for r in headed["ranking"]} == {"vit-head": 32, "mobilenet": 1280}

    # Rank, then fine-tune the ViT (its 5-class source head replaced by a 3-class one) with L2-SP.
    tune = {"strategy": "finetune", "target": image_ids[0], "regularizer": {"name": "l2sp"}, "epochs": 2,
            "lr": 3e-3, "batch_size": 8}
    tuned = wait_for(client, client.post("/v1/jobs", json={"dataset_id": dataset["id"], "tune": tune}).json()["id"],
                     stack)
    assert tuned["status"] == "succeeded", (tuned, stack.log_text())
    (checkpoint,) = client.get(f"/v1/jobs/{tuned['id']}/checkpoints").json()
    files = {f["path"] for f in checkpoint["files"]}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= files
    config_file = client.get(f"/v1/jobs/{tuned['id']}/checkpoints/{checkpoint['name']}/files/config.json").json()
    assert config_file["id2label"] == {"0": "blue", "1": "green", "2": "red"}

    # B-Tuning on images (both image models teach the ViT, through its features pooled as ranking pooled them),
    # with an embedding-space regularizer, which perturbs the normalised pixels.
    tune = {"strategy": "btuning", "top_k": 2, "target": image_ids[0], "epochs": 1, "lr": 3e-3, "batch_size": 8,
            "regularizer": {"name": "vat"}}
    distilled = wait_for(client, client.post("/v1/jobs", json={"dataset_id": dataset["id"], "tune": tune}).json()["id"],
                         stack)
    assert distilled["status"] == "succeeded", (distilled, stack.log_text())
    (student,) = distilled["tuning"]["models"]
    assert sorted(student["details"]["btuning"]["teachers"]) == sorted(image_hub)
    chosen = student["details"]["tradeoff_selection"]  # images choose the tradeoff alike
    assert len(chosen["trials"]) == 4 + len(chosen["extended"])


def test_too_large_upload_is_413(tmp_path: Path) -> None:
    from tests.integration.conftest import _make_stack

    for stack in _make_stack("sqlite", tmp_path, HUBTUNE_MAX_UPLOAD_BYTES="2000", HUBTUNE_AUTH="auto"):
        response = upload(httpx.Client(base_url=stack.url), topic_csv(400))
        assert response.status_code == 413, response.text
        assert response.json()["field"] == "file"
        leftovers = list((stack.home / "artifacts" / "datasets").iterdir())
        assert leftovers == []


def test_killed_worker_loses_no_job(stack: Stack, tiny_hub: dict[str, Path], tmp_path: Path) -> None:
    """SIGKILL the worker mid rank job; a new worker finishes it with exactly one ranking."""
    from tests.tiny_models import make_tiny_bert

    key = stack.create_key("k")
    client = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    # A wider model and longer texts so the feature pass lasts long enough to be interrupted.
    slow_model = make_tiny_bert(tmp_path / "bert-256", hidden_size=256, num_layers=4, seed=5)
    dataset = upload(client, topic_csv(1500, words=120)).json()
    ids = register_hub(client, {"bert-256": slow_model, **tiny_hub})
    worker = stack.start_worker()
    job_id = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "candidates": ids}).json()["id"]

    deadline = time.time() + 120
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["stage"].startswith("features") and job["progress"] > 0.02:
            break
        assert job["status"] in ("queued", "running"), job
        time.sleep(0.1)
    assert job["status"] == "running" and job["progress"] < 0.85, job
    stack.kill_worker(worker)

    stack.start_worker()
    job = wait_for(client, job_id, stack, timeout=300)
    assert job["status"] == "succeeded", (job, stack.log_text())
    assert job["attempts"] == 2
    assert sorted(r["rank"] for r in job["ranking"]) == [1, 2, 3, 4]
    assert len({r["model_id"] for r in job["ranking"]}) == 4


def test_cli_upload_rank_and_table(stack: Stack, tiny_hub: dict[str, Path], tmp_path: Path) -> None:
    key = stack.create_key("cli")
    stack.start_worker()
    data = tmp_path / "topics.jsonl"
    rows = list(csv.DictReader(io.StringIO(topic_csv(60).decode())))
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    uploaded = stack.cli("datasets", "upload", str(data), key=key)
    assert uploaded.returncode == 0, uploaded.stderr
    dataset_id = json.loads(uploaded.stdout)["id"]
    for name, path in tiny_hub.items():
        added = stack.cli("models", "add", "--path", str(path), "--name", name, key=key)
        assert added.returncode == 0, added.stderr
    ranked = stack.cli("rank", dataset_id, key=key, timeout=240)
    assert ranked.returncode == 0, ranked.stdout + ranked.stderr + stack.log_text()
    assert "succeeded" in ranked.stdout
    for name in tiny_hub:
        assert name in ranked.stdout
    assert "logme [95% CI]" in ranked.stdout


def test_serve_stops_its_worker_child_on_sigterm(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    from tests.integration.conftest import REPO, free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBTUNE_")}
    env.update(HUBTUNE_HOME=str(tmp_path), PYTHONPATH=str(REPO))
    port = free_port()
    serve = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    worker_pid = None
    deadline = time.time() + 60
    while time.time() < deadline and worker_pid is None:
        line = serve.stderr.readline()
        if "worker child process pid" in line:
            worker_pid = int(line.rsplit(" ", 1)[1])
    assert worker_pid, "serve did not start a worker"
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    while time.time() < deadline:  # the worker's own log (inherited stderr): its pool is up
        if " ready." in serve.stderr.readline():
            break
    serve.send_signal(signal.SIGTERM)
    serve.wait(timeout=40)
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(worker_pid, 0)
    with pytest.raises(ProcessLookupError):  # the pool children too
        os.killpg(worker_pid, 0)
    assert "ERROR" not in serve.stderr.read()  # a clean stop logs no error (the pool child is not signalled)

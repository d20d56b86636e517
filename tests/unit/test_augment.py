"""Text augmentation of the training rows: each operation's effect, determinism by seed, p = 0 as the identity,
validation rows never touched, the contract's checks, and a tiny BERT that trains with it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.contract import AUGMENTATIONS, TuneConfig, TuneSpec, check_tune_for_dataset, resolve_augment
from service.settings import Settings
from tests.tiny_models import make_tiny_bert
from workers.tuning import batches, loop
from workers.tuning.augment import (
    Vocabulary,
    augment_rows,
    random_deletion,
    random_insertion,
    random_swap,
)
from workers.tuning.data import ExampleDataset

SPORT = "game match team win player season goal".split()
MONEY = "market shares bank profit company economy price".split()
ROWS = ["the team won the game with a late goal in the season", "bank profit and company shares rose",
        "a  film   star", "solo"]


def toy(n: int, seed: int) -> ExampleDataset:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(SPORT if i % 2 == 0 else MONEY, 6)) for i in range(n)]
    return ExampleDataset(texts, np.array([i % 2 for i in range(n)]))


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_swap_keeps_the_tokens_and_moves_some():
    tokens = ROWS[0].split()
    out = random_swap(tokens, 0.2, rng())
    assert Counter(out) == Counter(tokens) and out != tokens
    assert random_swap(["solo"], 0.5, rng()) == ["solo"]


def test_delete_keeps_order_and_at_least_one_token():
    tokens = ROWS[0].split()
    out = random_deletion(tokens, 0.3, rng())
    assert 0 < len(out) < len(tokens)
    it = iter(tokens)
    assert all(any(t == u for u in it) for t in out)  # a subsequence: order kept
    assert len(random_deletion(tokens, 1.0, rng())) == 1
    assert random_deletion(["solo"], 1.0, rng()) == ["solo"]


def test_insert_adds_int_p_n_words_of_the_training_vocabulary():
    vocabulary = Vocabulary.of(ROWS)
    tokens = ROWS[1].split()  # 6 tokens: int(0.5 * 6) = 3 insertions
    out = random_insertion(tokens, 0.5, rng(), vocabulary)
    assert len(out) == len(tokens) + 3
    added = Counter(out) - Counter(tokens)
    assert sum(added.values()) == 3 and set(added) <= set(vocabulary.words)
    # drawn by frequency: "the" (3 times in the rows) comes about 3x as often as a word seen once
    gen = rng(2)
    draws = Counter(vocabulary.draw(gen) for _ in range(20000))
    assert 2.5 < draws["the"] / draws["bank"] < 3.5


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_p_zero_is_the_identity_and_a_seed_gives_the_same_rows(name):
    pairs = [(a, b) for a, b in zip(ROWS, ROWS[1:] + ROWS[:1], strict=True)]
    for rows in (ROWS, pairs):
        assert augment_rows(rows, name, 0.0, seed=3, epoch=0) == rows
        first = augment_rows(rows, name, 0.3, seed=3, epoch=0)
        assert first == augment_rows(rows, name, 0.3, seed=3, epoch=0)
        assert first != rows
        assert augment_rows(rows, name, 0.3, seed=4, epoch=0) != first
        assert augment_rows(rows, name, 0.3, seed=3, epoch=1) != first
    # a row left as it was keeps its spacing
    assert augment_rows(["a  film   star"], "swap", 0.0, seed=0, epoch=0) == ["a  film   star"]


def test_the_contract_checks_augment_and_names_the_field():
    assert TuneSpec.model_validate({"augment": {"name": "eda"}}).augment.p == 0.1
    assert resolve_augment({"name": "swap", "p": 1}) == {"name": "swap", "p": 1.0}
    for bad, where in (({"name": "synonym"}, "augment.name"), ({"name": "swap", "p": 1.5}, "augment.p"),
                       ({"name": "swap", "p": -0.1}, "augment.p"), ({"name": "swap", "q": 1}, "augment.q")):
        with pytest.raises(ValidationError) as info:
            TuneSpec.model_validate({"augment": bad})
        assert ".".join(str(x) for x in info.value.errors()[0]["loc"]) == where
        with pytest.raises(ValueError, match=where):
            TuneConfig(augment=bad).validate()
    with pytest.raises(ValueError, match=r"^tune\.augment: text augmentation applies to text datasets"):
        check_tune_for_dataset({"augment": {"name": "swap", "p": 0.1}}, "image")
    check_tune_for_dataset({"augment": {"name": "swap", "p": 0.1}}, "text")
    check_tune_for_dataset({"augment": None}, "image")


def test_the_api_refuses_a_bad_augmentation_with_422_naming_the_field(tmp_path: Path):
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", auth="auto",
                        bind_host="127.0.0.1")
    with TestClient(create_app(settings, send=lambda *a: None, run_reconciler=False),
                    raise_server_exceptions=False, base_url="http://127.0.0.1") as client:
        for bad, where in (({"name": "back_translate"}, "tune.augment.name"),
                           ({"name": "delete", "p": 2}, "tune.augment.p")):
            response = client.post("/v1/jobs", json={"dataset_id": "d", "tune": {"augment": bad}})
            assert response.status_code == 422, response.text
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.json()["field"] == where


def test_training_rows_are_augmented_every_epoch_and_validation_rows_never(tmp_path, monkeypatch):
    bert = make_tiny_bert(tmp_path / "bert")
    train_set, val_set = toy(48, 1), toy(24, 2)
    encoded: list[list] = []
    original = batches.EncodedTexts.__init__

    def spy(self, tokenizer, texts, *args, **kwargs):
        encoded.append(list(texts))
        original(self, tokenizer, texts, *args, **kwargs)

    monkeypatch.setattr(batches.EncodedTexts, "__init__", spy)
    config = TuneConfig(epochs=6, lr=3e-3, batch_size=8, max_length=16, warmup_ratio=0.0, save_every_steps=0,
                        device="cpu", augment={"name": "eda", "p": 0.2})
    result = loop.train(config, bert, train_set, val_set, "classification", ["sport", "business"], tmp_path / "c",
                        tmp_path / "s")
    val_encodings = [texts for texts in encoded if len(texts) == len(val_set.examples)]
    train_encodings = [texts for texts in encoded if len(texts) == len(train_set.examples)]
    assert val_encodings == [list(val_set.examples)]  # once, as given
    assert len(train_encodings) == 6  # one per epoch, each different from the rows and from each other
    assert all(texts != list(train_set.examples) for texts in train_encodings)
    assert len({tuple(texts) for texts in train_encodings}) == 6
    assert train_encodings[0] == augment_rows(train_set.examples, "eda", 0.2, seed=0, epoch=0)
    assert result.metrics["accuracy"] == 1.0
    assert result.config["augment"] == {"name": "eda", "p": 0.2}


def test_the_api_refuses_augmenting_an_image_dataset_before_queueing(tmp_path: Path):
    import io
    import zipfile

    from PIL import Image

    from tests.tiny_models import make_tiny_mobilenet

    def png(value: int) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", (6, 4), (value, value, value)).save(out, "PNG")
        return out.getvalue()

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(4):
            zf.writestr(f"{'dark' if i % 2 else 'light'}/{i}.png", png(40 * i))
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", auth="auto",
                        bind_host="127.0.0.1")
    with TestClient(create_app(settings, send=lambda *a: None, run_reconciler=False),
                    raise_server_exceptions=False, base_url="http://127.0.0.1") as client:
        uploaded = client.post("/v1/datasets", files={"file": ("shades.zip", archive.getvalue())},
                               data={"task": "classification"})
        assert uploaded.status_code == 201, uploaded.text
        model = client.post("/v1/models", json={"source": "local", "path": str(make_tiny_mobilenet(tmp_path / "m"))})
        assert model.status_code == 201, model.text
        body = {"dataset_id": uploaded.json()["id"], "candidates": [model.json()["id"]],
                "tune": {"augment": {"name": "swap", "p": 0.1}}}
        response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "tune.augment"

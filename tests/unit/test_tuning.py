"""The training loop on tiny models: it learns, it is reproducible, it cancels cleanly, it resumes where it was
killed, and its checkpoints load offline and predict (BERT and Llama)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from service.contract.tuning import TuneConfig
from tests.tiny_models import make_tiny_bert, make_tiny_llama, make_tiny_t5
from workers.tuning.btuning import BTuningTeacher
from workers.tuning.checkpoint import list_files
from workers.tuning.data import ExampleDataset
from workers.tuning.loop import STATE_FILE, TuningCancelled, train

torch.set_num_threads(1)

SPORT = "game match team win player season goal".split()
MONEY = "market shares bank profit company economy price".split()


def toy(n: int, seed: int) -> ExampleDataset:
    """Two classes told apart by their words: linearly separable, learnable in a few dozen steps."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        words = SPORT if i % 2 == 0 else MONEY
        texts.append(" ".join(rng.choice(words, 6)))
        labels.append(i % 2)
    return ExampleDataset(texts, np.array(labels))


TRAIN, VAL = toy(64, 1), toy(32, 2)
NAMES = ["sport", "business"]


def config(**overrides) -> TuneConfig:
    # device pinned: these checks are about the CPU contract (bit-exact), also when a GPU is present
    base = dict(epochs=4, lr=3e-3, batch_size=8, max_length=16, warmup_ratio=0.0, save_every_steps=0, seed=0,
                device="cpu")
    base.update(overrides)
    return TuneConfig(**base)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


@pytest.fixture(scope="module")
def baseline(bert_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline")
    seen: list[dict] = []
    result = train(config(), bert_dir, TRAIN, VAL, "classification", NAMES, root / "ckpt", root / "state",
                   on_progress=seen.append, card={"base_model": "tiny-bert", "base_revision": "abc123",
                                                  "dataset_sha256": "f" * 64})
    return result, root, seen


def test_tiny_bert_learns_a_separable_task(baseline):
    result, _, seen = baseline
    assert result.steps == result.total_steps == 4 * 8
    assert result.curve[-1]["train_loss"] < 0.5 * result.curve[0]["train_loss"]
    assert result.curve[-1]["val_loss"] < result.curve[0]["val_loss"]
    assert result.metrics["accuracy"] == 1.0 and result.metrics["macro_f1"] == 1.0
    assert 0.0 <= result.metrics["ece"] < 0.5
    assert [p["step"] for p in seen] == list(range(1, 33))
    assert [p["step"] for p in seen if "val_loss" in p] == [8, 16, 24, 32]
    # the last validation pass, as the dashboard plots it: all 32 rows right, on the diagonal
    diagnostics = result.details["diagnostics"]
    assert diagnostics["confusion_matrix"] == [[16, 0], [0, 16]]
    assert sum(b["count"] for b in diagnostics["reliability"]) == 32


def test_same_seed_gives_identical_metrics_and_another_seed_does_not(bert_dir, baseline, tmp_path):
    again = train(config(), bert_dir, TRAIN, VAL, "classification", NAMES, tmp_path / "a", tmp_path / "sa")
    assert again.metrics == baseline[0].metrics
    assert again.curve == baseline[0].curve
    other = train(config(seed=1), bert_dir, TRAIN, VAL, "classification", NAMES, tmp_path / "b", tmp_path / "sb")
    assert other.metrics["val_loss"] != baseline[0].metrics["val_loss"]


def test_cancel_leaves_no_checkpoint(bert_dir, tmp_path):
    calls = {"n": 0}

    def cancel() -> bool:
        calls["n"] += 1
        return calls["n"] > 5

    with pytest.raises(TuningCancelled) as info:
        train(config(), bert_dir, TRAIN, VAL, "classification", NAMES, tmp_path / "ckpt", tmp_path / "state",
              should_cancel=cancel)
    assert info.value.step == 5
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "ckpt.tmp").exists()


def test_killed_run_resumes_from_its_last_state_and_ends_like_an_uninterrupted_one(bert_dir, baseline, tmp_path):
    calls = {"n": 0}

    def cancel_at_step_3() -> bool:  # called before each step: the 4th call is before step index 3
        calls["n"] += 1
        return calls["n"] == 4

    with pytest.raises(TuningCancelled):
        train(config(save_every_steps=2), bert_dir, TRAIN, VAL, "classification", NAMES, tmp_path / "ckpt",
              tmp_path / "state", should_cancel=cancel_at_step_3)
    state = torch.load(tmp_path / "state" / STATE_FILE, weights_only=True)
    assert state["step"] == 2
    seen: list[dict] = []
    resumed = train(config(save_every_steps=2), bert_dir, TRAIN, VAL, "classification", NAMES, tmp_path / "ckpt",
                    tmp_path / "state", on_progress=seen.append)
    assert resumed.resumed_from_step == 2
    assert seen[0]["step"] == 3
    assert resumed.metrics == baseline[0].metrics  # bit-identical to the uninterrupted run
    assert resumed.curve == baseline[0].curve
    assert not (tmp_path / "state" / STATE_FILE).exists()
    # a re-delivered task after success returns the stored result without training again
    again = train(config(save_every_steps=2), bert_dir, TRAIN, VAL, "classification", NAMES, tmp_path / "ckpt",
                  tmp_path / "state", should_cancel=lambda: True)
    assert again.metrics == resumed.metrics


def test_checkpoint_loads_offline_and_predicts(baseline, monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result, root, _ = baseline
    folder = root / "ckpt"
    names = {f["path"] for f in list_files(folder)}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= names
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.id2label == {0: "sport", 1: "business"} and model.config.label2id["business"] == 1
    enc = tokenizer(VAL.examples, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1).numpy()
    assert float(np.mean(pred == VAL.labels)) == result.metrics["accuracy"]
    card = (folder / "README.md").read_text()
    for needle in ("f" * 64, "tiny-bert", "abc123", '"strategy": "finetune"', '"seed": 0', "accuracy"):
        assert needle in card
    assert not (root / "ckpt.tmp").exists()


def test_tiny_llama_trains_and_its_checkpoint_predicts(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    llama = make_tiny_llama(tmp_path / "llama")
    result = train(config(epochs=3, lr=5e-3), llama, TRAIN, VAL, "classification", NAMES, tmp_path / "ckpt",
                   tmp_path / "state")
    assert result.curve[-1]["train_loss"] < result.curve[0]["train_loss"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    enc = tokenizer(VAL.examples[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**enc).logits.shape == (4, 2)


@pytest.mark.parametrize("regularizer", ["smart", "vat", "lnsr"])
def test_an_encoder_decoder_tunes_with_embedding_and_layer_regularizers(tmp_path, regularizer):
    """T5 (T5ForSequenceClassification) embeds tokens in its encoder with its own embed_tokens module, not the shared
    one get_input_embeddings() returns: SMART's and VAT's hook never fired (an AssertionError at step 1). The
    perturbation now reaches the encoder's input, once per forward (the decoder's inputs stay clean)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from workers.tuning.regularizers import StepContext

    t5 = make_tiny_t5(tmp_path / "t5", seed=1)
    result = train(config(epochs=1, lr=3e-3, regularizer=regularizer), t5, TRAIN, VAL, "classification", NAMES,
                   tmp_path / "ckpt", tmp_path / "state")
    assert np.isfinite(result.metrics["val_loss"])

    model = AutoModelForSequenceClassification.from_pretrained(t5, num_labels=2).eval()
    enc = AutoTokenizer.from_pretrained(t5)(VAL.examples[:3], padding=True, return_tensors="pt")
    ctx = StepContext(model, {**enc, "labels": torch.tensor([0, 1, 0]), "index": torch.arange(3)}, "classification")
    with torch.no_grad():
        clean, _ = ctx.clean_forward()
        assert ctx.embeds is not None and ctx.embeds.shape == (*enc["input_ids"].shape, 32)
        shifted, _ = ctx.forward(perturb=lambda embeds: embeds + 0.5)
    assert not torch.allclose(clean, shifted)


def test_btuning_and_a_regularizer_run_through_the_loop(bert_dir, tmp_path):
    rng = np.random.default_rng(0)
    n, c = len(TRAIN.examples), 2
    onehot = np.eye(c)[TRAIN.labels]
    feats = [onehot @ rng.normal(size=(c, 8)) + 0.1 * rng.normal(size=(n, 8)) for _ in range(3)]
    ms = [np.linalg.lstsq(f, onehot, rcond=None)[0].T for f in feats]  # (C, D_k) linear readouts
    teacher = BTuningTeacher(feats, ms, scores=[-0.5, -0.6, -0.9], student_weights=rng.normal(size=(c, 32)) * 0.1)
    result = train(config(strategy="btuning", tradeoff=0.5, regularizer="l2sp", epochs=2), bert_dir, TRAIN, VAL,
                   "classification", NAMES, tmp_path / "ckpt", tmp_path / "state", teacher=teacher)
    assert result.details["btuning"]["weights"][0] > result.details["btuning"]["weights"][2]
    assert result.curve[-1]["train_total_loss"] > result.curve[-1]["train_loss"]  # the extra terms were added
    with pytest.raises(ValueError, match="teacher"):
        train(config(strategy="btuning"), bert_dir, TRAIN, VAL, "classification", NAMES, tmp_path / "x",
              tmp_path / "sx")


@pytest.mark.parametrize("task", ["regression", "multilabel"])
def test_btuning_distils_regression_and_multilabel_targets(task, bert_dir, tmp_path):
    """B-Tuning's teachers predict whatever LogME fits: standardised regression outputs or 0/1 labels, as ranking
    scores them, and the student is pulled towards their combined prediction."""
    from workers.features import extract_features
    from workers.pipeline import ranking_targets
    from workers.ranking import logme

    if task == "regression":
        y_train, y_val = TRAIN.labels * 4.0 + 10.0, VAL.labels * 4.0 + 10.0  # a mean and scale to standardise
    else:
        y_train = np.stack([TRAIN.labels, 1 - TRAIN.labels, np.ones_like(TRAIN.labels)], 1)
        y_val = np.stack([VAL.labels, 1 - VAL.labels, np.ones_like(VAL.labels)], 1)
    fit_targets = ranking_targets(y_train, task)
    y2 = fit_targets.reshape(len(fit_targets), -1).astype(np.float64)
    rng = np.random.default_rng(0)
    # two informative teachers (features that carry the target) and the student's own pretrained features
    feats = [y2 @ rng.normal(size=(y2.shape[1], 8)) + 0.1 * rng.normal(size=(len(y2), 8)) for _ in range(2)]
    student = extract_features(bert_dir, TRAIN.examples, device="cpu", max_length=16).features.astype(np.float64)
    fits = [logme(f, fit_targets, task) for f in feats]
    teacher = BTuningTeacher(feats, [r.weights for r in fits], [r.score for r in fits],
                             student_weights=logme(student, fit_targets, task).weights)
    assert teacher.target.shape == (len(TRAIN.examples), fit_targets.shape[1] if fit_targets.ndim == 2 else 1)
    result = train(config(strategy="btuning", epochs=4), bert_dir, ExampleDataset(TRAIN.examples, y_train),
                   ExampleDataset(VAL.examples, y_val), task, None, tmp_path / "ckpt", tmp_path / "state",
                   teacher=teacher)
    # the distillation term (total - task loss) is in the loss and is what training reduces: with this random tiny
    # BERT, AdamW's steps on the backbone follow it rather than the task (the head reads [CLS] through the pooler,
    # not the mean-pooled features distilled), so the task itself is learnt only by fine-tuning here
    distill = [p["train_total_loss"] - p["train_loss"] for p in result.curve]
    assert distill[0] > 5 * distill[-1] > 0, result.curve
    assert all(np.isfinite(v) for v in result.metrics.values() if v is not None), result.metrics


@pytest.mark.parametrize("head", ["bert", "llama"])
def test_regression_far_from_zero_trains_standardised_and_the_checkpoint_predicts_y(head, tmp_path):
    """Targets around 1000: the loop trains on standardised targets, so the fit is the same as around 0, and the
    checkpoint predicts y itself: folded into the head's weight and bias (BERT), or, for a bias-free decoder head
    (Llama's `score`), into the weight with the mean in config.json as hubtune_target_offset."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = make_tiny_bert(tmp_path / "bert") if head == "bert" else make_tiny_llama(tmp_path / "llama")
    results = {}
    for offset in (0.0, 1000.0):
        y_train, y_val = TRAIN.labels * 4.0 + offset, VAL.labels * 4.0 + offset
        results[offset] = train(config(epochs=6), folder, ExampleDataset(TRAIN.examples, y_train),
                                ExampleDataset(VAL.examples, y_val), "regression", None, tmp_path / f"c{offset}",
                                tmp_path / f"s{offset}")
    near, far = results[0.0], results[1000.0]
    assert far.metrics["r2"] > 0.9, far.metrics  # raw targets: R^2 about -60000 (the head starts at 0)
    assert far.metrics["rmse"] == pytest.approx(near.metrics["rmse"], rel=1e-3, abs=1e-3)
    tuned = AutoModelForSequenceClassification.from_pretrained(tmp_path / "c1000.0").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "c1000.0")
    with torch.no_grad():
        out = torch.cat([tuned(**tokenizer([t], return_tensors="pt")).logits for t in VAL.examples]).numpy()[:, 0]
    out = out + np.asarray(getattr(tuned.config, "hubtune_target_offset", [0.0]))[0]
    rmse = float(np.sqrt(np.mean((out - (VAL.labels * 4.0 + 1000.0)) ** 2)))
    assert rmse == pytest.approx(far.metrics["rmse"], rel=1e-3, abs=1e-3)
    assert far.details["target_scaling"]["folded"] == ("weight and bias" if head == "bert" else "weight")
    assert hasattr(tuned.config, "hubtune_target_offset") == (head == "llama")


def test_multilabel_and_regression_report_their_metrics(bert_dir, tmp_path):
    y_multi = np.stack([TRAIN.labels, 1 - TRAIN.labels, np.ones_like(TRAIN.labels)], 1)
    v_multi = np.stack([VAL.labels, 1 - VAL.labels, np.ones_like(VAL.labels)], 1)
    multi = train(config(epochs=2), bert_dir, ExampleDataset(TRAIN.examples, y_multi),
                  ExampleDataset(VAL.examples, v_multi), "multilabel", ["a", "b", "c"], tmp_path / "m", tmp_path / "sm")
    assert set(multi.metrics) == {"val_loss", "micro_f1", "macro_f1", "ece", "trainable_parameters",
                                  "total_parameters"}
    reg = train(config(epochs=2), bert_dir, ExampleDataset(TRAIN.examples, TRAIN.labels * 2.0 - 1.0),
                ExampleDataset(VAL.examples, VAL.labels * 2.0 - 1.0), "regression", None, tmp_path / "r",
                tmp_path / "sr")
    assert set(reg.metrics) == {"val_loss", "rmse", "r2", "trainable_parameters", "total_parameters"}
    assert len(reg.details["diagnostics"]["predicted_vs_true"]) == 32
    assert "reliability" in multi.details["diagnostics"]
    assert reg.metrics["rmse"] < 1.0  # better than predicting 0 for targets of +-1
    data = json.loads((tmp_path / "sr" / "result.json").read_text())
    assert data["result"]["task"] == "regression"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("regularizer", ["none", "r3f"])
def test_cuda_training_learns_and_its_checkpoint_loads_on_cpu(bert_dir, tmp_path, regularizer):
    # bf16 autocast on the GPU, except for the noise-based regularizers that need float32 (details["bf16"])
    from transformers import AutoModelForSequenceClassification

    result = train(config(device="cuda", regularizer=regularizer), bert_dir, TRAIN, VAL, "classification", NAMES,
                   tmp_path / "ckpt", tmp_path / "state")
    assert result.details["device"].startswith("cuda")
    assert result.details["bf16"] is (regularizer == "none")
    assert result.metrics["accuracy"] == 1.0
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt")  # saved float32, loads on CPU
    assert next(model.parameters()).dtype == torch.float32


def test_max_length_beyond_the_models_positions_is_capped(bert_dir, tmp_path):
    """The API accepts max_length up to 8192; a 256-position BERT fed 600-token texts at max_length 1024 overflowed
    its position embeddings at the first step. The loop reads what the model can, as ranking does."""
    texts = [" ".join(["game" if i % 2 else "bank"] * 600) for i in range(16)]
    data = ExampleDataset(texts, np.arange(16) % 2)
    result = train(config(epochs=1, max_length=1024), bert_dir, data, data, "classification", NAMES,
                   tmp_path / "ckpt", tmp_path / "state")
    assert result.details["max_length"] == 256 and np.isfinite(result.metrics["val_loss"])


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_an_empty_validation_split_tunes_and_reports_no_scores(task, bert_dir, tmp_path):
    """Uploads need only 2 rows, and a class with one example has none to hold out: the validation split can be
    empty. The tokenizer failed on an empty list; now the run finishes with val_loss None (regression folds its
    target scale on a training batch)."""
    y = TRAIN.labels if task == "classification" else TRAIN.labels * 3.0 + 50.0
    result = train(config(epochs=1), bert_dir, ExampleDataset(TRAIN.examples, y), ExampleDataset([], y[:0]), task,
                   NAMES if task == "classification" else None, tmp_path / "ckpt", tmp_path / "state")
    assert result.metrics == {"val_loss": None, "trainable_parameters": result.metrics["total_parameters"],
                              "total_parameters": result.metrics["total_parameters"]}
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()


def test_text_pairs_train_as_the_tokenizers_pair_and_the_checkpoint_predicts_pairs(bert_dir, tmp_path):
    """A task only the pair decides (do the two texts share a topic?): batches hold [CLS] a [SEP] b [SEP] with
    token type ids, the tuned checkpoint predicts from tokenizer(a, b) what the loop measured."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from workers.tuning.batches import EncodedTexts as _Encoded

    def pairs(n: int, seed: int) -> ExampleDataset:
        rng = np.random.default_rng(seed)
        texts, labels = [], []
        for _ in range(n):
            first, second = (SPORT, MONEY)[rng.integers(2)], (SPORT, MONEY)[rng.integers(2)]
            texts.append((" ".join(rng.choice(first, 4)), " ".join(rng.choice(second, 4))))
            labels.append(int(first is second))
        return ExampleDataset(texts, np.array(labels))

    train_set, val_set = pairs(96, 1), pairs(32, 2)
    tokenizer = AutoTokenizer.from_pretrained(bert_dir)
    encoded = _Encoded(tokenizer, train_set.examples, train_set.labels, max_length=16)
    first = tokenizer(*train_set.examples[0], truncation=True, max_length=16)
    assert encoded.input_ids[0] == first["input_ids"] and encoded.token_type_ids[0] == first["token_type_ids"]
    assert max(first["token_type_ids"]) == 1
    result = train(config(epochs=20, max_length=16), bert_dir, train_set, val_set, "classification", ["no", "yes"],
                   tmp_path / "ckpt", tmp_path / "state")
    assert result.metrics["accuracy"] >= 0.9, result.metrics  # the pair is read together (chance is ~0.5)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    enc = tokenizer([a for a, _ in val_set.examples], [b for _, b in val_set.examples], padding=True,
                    truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1).numpy()
    assert float(np.mean(pred == val_set.labels)) == result.metrics["accuracy"]

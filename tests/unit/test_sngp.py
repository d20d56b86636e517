"""SNGP head (workers/tuning/sngp.py): the spectral bound holds through training, the predictive variance grows
away from the training rows, the Laplace precision and mean-field logits are the formulas', the OOD AUROC is
scikit-learn's, and a tuned checkpoint reloads offline to the same probabilities."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from service.contract import TuneSpec, check_tune_for_dataset, resolve_sngp
from tests.tiny_models import make_tiny_bert
from tests.unit.test_tuning import NAMES, TRAIN, VAL, config
from workers.tuning.evaluation import auroc, classification_metrics, ood_auroc
from workers.tuning.loop import train
from workers.tuning.sngp import (
    SNGPHead,
    bound_spectral_norm,
    fit_precision,
    load_sngp_classifier,
    predict_proba,
    settle_spectral_norms,
    spectral_norms,
)

torch.set_num_threads(1)

DEFAULTS = resolve_sngp(None)


def head(d: int = 16, classes: int = 3, **settings) -> SNGPHead:
    torch.manual_seed(0)
    return SNGPHead(d, classes, {**DEFAULTS, **settings})


class _Rows:
    """Feature rows as the loop's batches give them (fit_precision reads `batch(index, device, task)`)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, index, device, task):
        return {"inputs": self.x[index]}


class _Wrapped(nn.Module):
    def __init__(self, sngp: SNGPHead) -> None:
        super().__init__()
        self.head = sngp

    def forward(self, inputs):
        return self.head(inputs)


def fit(sngp: SNGPHead, x: torch.Tensor) -> None:
    from contextlib import nullcontext

    import workers.tuning.batches as batches

    original = batches.model_inputs
    batches.model_inputs = lambda batch: batch  # our rows have no input_ids: pass them through
    try:
        fit_precision(_Wrapped(sngp), _Rows(x), torch.device("cpu"), 7, "classification", nullcontext)
    finally:
        batches.model_inputs = original


# ------------------------------------------------------------------------------------------- spectral bound


def test_spectral_norm_stays_under_the_bound_through_training_and_would_not_without_it():
    torch.manual_seed(0)
    layer = bound_spectral_norm(nn.Linear(24, 24), 0.95)
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(5.0)  # raw weight far above the bound
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    x, target = torch.randn(64, 24), 10 * torch.randn(64, 24)  # a target that pulls the norm up
    for _ in range(60):
        loss = ((layer(x) - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    layer.eval()
    lagging = float(torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2))
    settle_spectral_norms(layer)
    used = float(torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2))
    raw = float(torch.linalg.matrix_norm(layer.parametrizations.weight.original.detach().double(), ord=2))
    assert used <= 0.95 * (1 + 1e-3)
    assert used > 0.9  # the loss wants a larger norm: the bound is active, not trivially met
    assert raw > 2.0  # the unconstrained weight is far above the bound
    assert lagging < 1.25  # one power iteration per step lags a fast-moving weight, by this much here


def test_a_weight_under_the_bound_is_left_as_it_is():
    layer = nn.Linear(8, 8)
    with torch.no_grad():
        layer.weight.copy_(0.5 * torch.eye(8))
    bound_spectral_norm(layer, 0.95)
    assert torch.allclose(layer.weight, 0.5 * torch.eye(8), atol=1e-6)


# -------------------------------------------------------------------------------------- distance awareness


def test_variance_grows_away_from_the_training_rows():
    sngp = head(d=16).eval()
    torch.manual_seed(1)
    center = torch.randn(16)
    train_rows = center + 0.3 * torch.randn(200, 16)
    fit(sngp, train_rows)
    direction = torch.randn(16)
    direction /= direction.norm()
    with torch.no_grad():
        variances = [float(sngp.variance(sngp.random_features(train_rows[:50] + t * direction)).mean())
                     for t in (0.0, 2.0, 5.0, 20.0)]
    assert all(a < b for a, b in zip(variances, variances[1:])), variances
    assert variances[0] < 0.2 * variances[-1], variances
    with torch.no_grad():  # rows of another distribution altogether: near the prior variance s^T s ~ 1
        other = torch.randn(50, 16) - center
        prior = float((sngp.amplitude * sngp.random_features(other).double()).pow(2).sum(-1).mean())
        assert prior == pytest.approx(1.0, abs=0.1)
        assert float(sngp.variance(sngp.random_features(other)).mean()) > 0.5 * prior


def test_far_rows_get_flatter_probabilities_than_training_rows():
    sngp = head(d=16, classes=3).eval()
    torch.manual_seed(2)
    train_rows = torch.randn(300, 16)
    fit(sngp, train_rows)
    with torch.no_grad():
        sngp.output.weight.mul_(300)  # confident MAP logits everywhere
        near = torch.softmax(sngp(train_rows[:50]), -1).max(-1).values.mean()
        far = torch.softmax(sngp(train_rows[:50] * 25), -1).max(-1).values.mean()
    assert float(far) < float(near)


# ---------------------------------------------------------------------------------------- the formulas


def test_laplace_precision_and_mean_field_logits_match_a_hand_computation():
    sngp = head(d=3, classes=2, random_features=8, ridge=0.5)
    x = torch.tensor([[0.1, -1.0, 2.0], [1.5, 0.2, -0.3], [-0.7, 0.4, 0.9], [2.0, 2.0, -1.0]])
    fit(sngp, x)
    sngp.eval()
    # by hand, in float64 numpy: h = x + relu(W x + b), z = LayerNorm(h), phi = cos(z Omega + b_rff)
    w = sngp.hidden.weight.detach().double().numpy()  # the bounded weight as the head uses it
    b = sngp.hidden.bias.detach().double().numpy()
    xn = x.double().numpy()
    h = xn + np.maximum(xn @ w.T + b, 0.0)
    z = (h - h.mean(1, keepdims=True)) / np.sqrt(h.var(1, keepdims=True) + 1e-5)
    phi = np.cos(z @ sngp.omega.double().numpy() + sngp.phase.double().numpy())
    scaled = math.sqrt(2 / 8) * phi  # Rahimi & Recht's features: s^T s' approximates the RBF kernel
    precision = 0.5 * np.eye(8) + scaled.T @ scaled
    np.testing.assert_allclose(sngp.precision.numpy(), precision, rtol=1e-5, atol=1e-5)
    variance = 0.5 * np.einsum("ij,jk,ik->i", scaled, np.linalg.inv(precision), scaled)
    logits_map = phi @ sngp.output.weight.detach().double().numpy().T
    expected = logits_map / np.sqrt(1 + math.pi / 8 * variance)[:, None]
    with torch.no_grad():
        got = sngp(x).double().numpy()
        np.testing.assert_allclose(sngp.variance(sngp.random_features(x)).numpy(), variance, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    sngp.train()
    with torch.no_grad():  # training mode: the MAP logits
        np.testing.assert_allclose(sngp(x).double().numpy(), logits_map, rtol=1e-4, atol=1e-6)


def test_auroc_is_the_mann_whitney_statistic_with_ties():
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40).astype(float), rng.integers(0, 4, 60).astype(float)
    expected = mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg))  # U counts ties as one half
    assert auroc(pos, neg) == pytest.approx(expected, abs=1e-12)
    assert ood_auroc(np.array([[5.0, 0.0]] * 3), np.array([[0.0, 0.0]] * 2)) == 1.0  # flat = uncertain


# ------------------------------------------------------------------------------------------- the contract


def test_the_contract_refuses_what_sngp_cannot_do():
    assert TuneSpec.model_validate({}).head == "linear"
    with pytest.raises(ValueError, match="sngp"):
        check_tune_for_dataset({"head": "sngp"}, "text", task="regression")
    check_tune_for_dataset({"head": "sngp"}, "text", task="classification")
    with pytest.raises(ValueError, match="head"):
        TuneSpec.model_validate({"sngp": {"ridge": 2}})
    assert TuneSpec.model_validate({"head": "sngp", "sngp": {"ridge": 2}}).sngp.ridge == 2


# ----------------------------------------------------------------------------------- through the training loop


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("sngp")
    bert = make_tiny_bert(root / "bert")
    ood = ["lorem ipsum dolor sit amet", "the quick brown fox", "zebra quantum violin"] * 4
    result = train(config(head="sngp"), bert, TRAIN, VAL, "classification", NAMES, root / "ckpt", root / "state",
                   ood=ood)
    return result, root, bert, ood


def test_a_tuned_sngp_checkpoint_reloads_to_the_same_probabilities(tuned, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result, root, _, _ = tuned
    folder = root / "ckpt"
    assert json.loads((folder / "sngp.json").read_text())["output_layer"] == "classifier"
    model = load_sngp_classifier(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    enc = tokenizer(VAL.examples, padding=True, truncation=True, max_length=16, return_tensors="pt")
    probs = predict_proba(model, **enc).double().numpy()
    again = predict_proba(load_sngp_classifier(folder), **enc).double().numpy()
    np.testing.assert_allclose(again, probs, atol=1e-7)
    metrics = classification_metrics(np.log(probs), VAL.labels)
    loss = float(-np.log(probs[np.arange(len(VAL.labels)), VAL.labels]).mean())
    assert loss == pytest.approx(result.metrics["val_loss"], abs=1e-5)
    assert metrics["ece"] == pytest.approx(result.metrics["ece"], abs=1e-5)
    assert metrics["accuracy"] == result.metrics["accuracy"]
    assert "load_sngp_classifier" in (folder / "README.md").read_text()


def test_the_run_reports_bounds_ece_and_an_ood_score(tuned):
    result, _, _, ood = tuned
    assert result.metrics["accuracy"] >= 0.9
    assert 0.0 <= result.metrics["ece"] <= 1.0
    assert 0.0 <= result.metrics["ood_auroc"] <= 1.0 and result.details["ood_rows"] == len(ood)
    sngp = result.details["sngp"]
    assert sngp["precision_rows"] == len(TRAIN.examples)
    assert all(value <= 0.95 * (1 + 1e-3) for value in sngp["spectral_norms"].values()), sngp


def test_the_linear_head_reports_the_same_ood_score_and_is_unchanged_without_it(tuned, tmp_path):
    _, _, bert, ood = tuned
    plain = train(config(), bert, TRAIN, VAL, "classification", NAMES, None, None)
    with_ood = train(config(), bert, TRAIN, VAL, "classification", NAMES, None, None, ood=ood)
    assert "ood_auroc" not in plain.metrics and 0.0 <= with_ood.metrics["ood_auroc"] <= 1.0
    assert {k: v for k, v in with_ood.metrics.items() if k != "ood_auroc"} == plain.metrics


@pytest.mark.parametrize("regularizer", ["r3f", "sam", "l2sp"])
def test_sngp_composes_with_regularizers_that_rerun_the_forward(tuned, tmp_path, regularizer):
    _, _, bert, _ = tuned
    result = train(config(head="sngp", regularizer=regularizer, epochs=1), bert, TRAIN, VAL, "classification",
                   NAMES, None, None)
    assert result.metrics["accuracy"] is not None
    assert all(v <= 0.95 * (1 + 1e-3) for v in result.details["sngp"]["spectral_norms"].values())


def test_spectral_norms_reads_only_bounded_layers():
    model = nn.Sequential(bound_spectral_norm(nn.Linear(4, 4), 0.5), nn.Linear(4, 2))
    assert list(spectral_norms(model)) == ["0"]


def test_sngp_with_lora_trains_adapters_and_its_checkpoints_reload(tuned, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, _, bert, _ = tuned
    peft = {"method": "lora", "r": 4, "merge": True}
    result = train(config(head="sngp", peft=peft), bert, TRAIN, VAL, "classification", NAMES, tmp_path / "ckpt",
                   tmp_path / "state")
    folder = tmp_path / "ckpt"
    assert (folder / "adapter_config.json").exists() and (folder / "sngp.json").exists()
    assert result.metrics["trainable_parameters"] < result.metrics["total_parameters"]
    enc = AutoTokenizer.from_pretrained(folder)(VAL.examples, padding=True, truncation=True, max_length=16,
                                                return_tensors="pt")
    for reloaded in (load_sngp_classifier(folder), load_sngp_classifier(folder / "merged")):
        probs = predict_proba(reloaded, **enc).double().numpy()
        loss = float(-np.log(probs[np.arange(len(VAL.labels)), VAL.labels]).mean())
        assert loss == pytest.approx(result.metrics["val_loss"], abs=1e-5)
        assert classification_metrics(np.log(probs), VAL.labels)["ece"] == pytest.approx(result.metrics["ece"],
                                                                                         abs=1e-5)


@pytest.mark.parametrize("maker", ["roberta", "mobilenet"])
def test_other_heads_get_the_gp_and_reload(maker, tmp_path, monkeypatch):
    """RoBERTa's head has a hidden dense layer (bounded too) before out_proj; MobileNetV2 reads images."""
    from tests.tiny_models import make_tiny_mobilenet, make_tiny_roberta
    from tests.unit.test_image_tuning import TRAIN as IMAGES_TRAIN
    from tests.unit.test_image_tuning import VAL as IMAGES_VAL

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if maker == "roberta":
        folder, train_set, val_set, names = make_tiny_roberta(tmp_path / "m"), TRAIN, VAL, NAMES
    else:
        folder, train_set, val_set = make_tiny_mobilenet(tmp_path / "m"), IMAGES_TRAIN, IMAGES_VAL
        names = ["red", "green", "blue"]
    result = train(config(head="sngp", epochs=2), folder, train_set, val_set, "classification", names,
                   tmp_path / "ckpt", tmp_path / "state")
    described = json.loads((tmp_path / "ckpt" / "sngp.json").read_text())
    if maker == "roberta":
        assert described["output_layer"] == "classifier.out_proj"
        assert described["bounded_layers"] == ["classifier.dense"]
        assert set(result.details["sngp"]["spectral_norms"]) == {"classifier.dense", "classifier.out_proj.hidden"}
    model = load_sngp_classifier(tmp_path / "ckpt")
    if maker == "roberta":
        from transformers import AutoTokenizer

        inputs = AutoTokenizer.from_pretrained(tmp_path / "ckpt")(val_set.examples, padding=True, truncation=True,
                                                                 max_length=16, return_tensors="pt")
    else:
        from transformers import AutoImageProcessor

        from workers.features import decode_images

        processor = AutoImageProcessor.from_pretrained(tmp_path / "ckpt")
        inputs = {"pixel_values": processor(images=decode_images(val_set.examples), return_tensors="pt")[
            "pixel_values"]}
    probs = predict_proba(model, **inputs).double().numpy()
    assert classification_metrics(np.log(probs), val_set.labels)["ece"] == pytest.approx(result.metrics["ece"],
                                                                                         abs=1e-5)

"""Sharpness-aware minimisation: the perturbation (norm rho along the gradient; ASAM's scaled norm), the gradient
taken at the perturbed weights, the weights restored before the optimizer steps, and tiny models that train with it.

Expected values are computed here from the gradients directly (flattened vectors), not from the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from service.contract.tuning import TuneConfig, describe_regularizers, resolve_regularizer
from tests.tiny_models import make_tiny_bert
from workers.tuning import loop
from workers.tuning.btuning import BTuningTeacher
from workers.tuning.data import ExampleDataset
from workers.tuning.regularizers import SAM, build_regularizer, sam_perturbation

torch.set_num_threads(1)

SPORT = "game match team win player season goal".split()
MONEY = "market shares bank profit company economy price".split()


def toy(n: int, seed: int) -> ExampleDataset:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(SPORT if i % 2 == 0 else MONEY, 6)) for i in range(n)]
    return ExampleDataset(texts, np.array([i % 2 for i in range(n)]))


TRAIN, VAL = toy(48, 1), toy(24, 2)
NAMES = ["sport", "business"]


def config(**overrides) -> TuneConfig:
    base = dict(epochs=3, lr=3e-3, batch_size=8, max_length=16, warmup_ratio=0.0, save_every_steps=0, seed=0,
                device="cpu")
    base.update(overrides)
    return TuneConfig(**base)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


def two_layer(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    return model, torch.randn(7, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0])


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def test_sam_perturbation_has_norm_rho_and_lies_along_the_gradient():
    model, x, y = two_layer()
    loss_of(model, x, y).backward()
    named = list(model.named_parameters())
    e = flat(sam_perturbation(named, rho=0.07))
    g = flat(p.grad for _, p in named)
    assert float(e.norm()) == pytest.approx(0.07, rel=1e-6)
    assert float(torch.dot(e, g) / (e.norm() * g.norm())) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(e, 0.07 * g / g.norm(), atol=1e-7)


def test_asam_perturbation_has_scaled_norm_rho_and_lies_along_the_scaled_gradient():
    """ASAM: e = rho T^2 g / ||T g||, T = |w| + eta on weight matrices and 1 on biases, so ||T^-1 e|| = rho."""
    model, x, y = two_layer()
    loss_of(model, x, y).backward()
    named = list(model.named_parameters())
    eta = 0.01
    t = flat(p.detach().abs() + eta if name.endswith("weight") else torch.ones_like(p) for name, p in named)
    g = flat(p.grad for _, p in named)
    e = flat(sam_perturbation(named, rho=0.5, adaptive=True, eta=eta))
    assert float((e / t).norm()) == pytest.approx(0.5, rel=1e-6)
    expected = 0.5 * t * t * g / (t * g).norm()
    assert torch.allclose(e, expected, atol=1e-7)
    assert not torch.allclose(e / e.norm(), g / g.norm(), atol=1e-3)  # not plain SAM's direction


def test_sam_takes_the_gradient_at_the_perturbed_weights_and_restores_the_weights_exactly():
    model, x, y = two_layer()
    before = [p.detach().clone() for p in model.parameters()]
    loss = loss_of(model, x, y)
    loss.backward()
    g = flat(p.grad for p in model.parameters())
    e = 0.05 * g / g.norm()

    # the gradient at w + e, by hand on a copy
    probe, _, _ = two_layer()
    with torch.no_grad():
        offset = 0
        for p in probe.parameters():
            p.add_(e[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    loss_of(probe, x, y).backward()
    expected = flat(p.grad for p in probe.parameters())

    def recompute() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        again = loss_of(model, x, y)
        again.backward()
        return again.detach()

    piece = SAM(rho=0.05)
    piece.after_backward(model, loss, recompute)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before, strict=True))
    assert torch.allclose(flat(p.grad for p in model.parameters()), expected, atol=1e-6)
    assert piece.describe()["mean_loss_increase"] > 0  # uphill: e points along the gradient


def test_rho_zero_leaves_training_bit_identical_to_plain_fine_tuning(bert_dir, tmp_path):
    plain = loop.train(config(epochs=1), bert_dir, TRAIN, VAL, "classification", NAMES, tmp_path / "a", tmp_path / "sa")
    flat_sam = loop.train(config(epochs=1, regularizer="sam", regularizer_params={"rho": 0.0}), bert_dir, TRAIN,
                          VAL, "classification", NAMES, tmp_path / "b", tmp_path / "sb")
    assert flat_sam.metrics == plain.metrics and flat_sam.curve == plain.curve


def test_the_optimizer_steps_from_the_restored_weights_and_a_tiny_bert_learns(bert_dir, tmp_path, monkeypatch):
    """Through the loop: the weights the optimizer starts each step from are those before SAM moved them."""
    seen: dict[str, list] = {"before": [], "at_step": []}
    original_after_backward = SAM.after_backward

    def recording(self, model, loss, recompute):
        seen["before"].append([p.detach().clone() for p in model.parameters()])
        return original_after_backward(self, model, loss, recompute)

    original_optimizer = loop._optimizer

    def optimizer_with_probe(model, cfg):
        opt = original_optimizer(model, cfg)
        opt.register_step_pre_hook(lambda *_: seen["at_step"].append(
            [p.detach().clone() for p in model.parameters()]))
        return opt

    monkeypatch.setattr(SAM, "after_backward", recording)
    monkeypatch.setattr(loop, "_optimizer", optimizer_with_probe)
    result = loop.train(config(regularizer="sam", regularizer_params={"rho": 0.05}, epochs=6), bert_dir, TRAIN, VAL,
                        "classification", NAMES, tmp_path / "ckpt", tmp_path / "state")
    assert len(seen["before"]) == len(seen["at_step"]) == result.steps == 36
    for before, at_step in zip(seen["before"], seen["at_step"], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(before, at_step, strict=True))
    assert result.metrics["accuracy"] == 1.0
    assert result.details["sam"]["rho"] == 0.05 and result.details["sam"]["mean_loss_increase"] > 0


def test_asam_and_sam_with_btuning_train_and_the_recomputed_loss_holds_every_term(bert_dir, tmp_path):
    """SAM recomputes the step's whole loss at w + e: with B-Tuning's term (here large) left out of the second
    pass, L(w + e) - L(w) would be about minus that term; it is positive (uphill)."""
    asam = loop.train(config(regularizer="sam", regularizer_params={"rho": 0.5, "adaptive": True}, epochs=4), bert_dir,
                      TRAIN, VAL, "classification", NAMES, tmp_path / "a", tmp_path / "sa")
    assert asam.curve[-1]["train_loss"] < asam.curve[0]["train_loss"] and asam.metrics["accuracy"] == 1.0
    rng = np.random.default_rng(0)
    onehot = np.eye(2)[TRAIN.labels]
    feats = [onehot @ rng.normal(size=(2, 8)) + 0.1 * rng.normal(size=(len(TRAIN.labels), 8)) for _ in range(2)]
    ms = [np.linalg.lstsq(f, onehot, rcond=None)[0].T for f in feats]
    teacher = BTuningTeacher(feats, ms, scores=[-0.5, -0.6], student_weights=rng.normal(size=(2, 32)) * 0.1)
    both = loop.train(config(strategy="btuning", tradeoff=10.0, regularizer="sam", epochs=1), bert_dir, TRAIN, VAL,
                      "classification", NAMES, tmp_path / "b", tmp_path / "sb", teacher=teacher)
    term = both.curve[-1]["train_total_loss"] - both.curve[-1]["train_loss"]
    assert term > 1.0
    assert both.details["sam"]["mean_loss_increase"] > 0


def test_the_contract_lists_sam_with_its_defaults_and_refuses_bad_values():
    listed = describe_regularizers()["sam"]
    assert listed["rho"]["default"] == 0.05 and listed["adaptive"]["default"] is False
    assert resolve_regularizer("sam", {"adaptive": True}) == {"rho": 0.05, "adaptive": True, "eta": 0.01}
    with pytest.raises(ValueError, match=r"regularizer.params.rho: must be >= 0"):
        resolve_regularizer("sam", {"rho": -1})
    with pytest.raises(ValueError, match="regularizer.params.adaptive"):
        resolve_regularizer("sam", {"adaptive": "yes"})
    assert isinstance(build_regularizer("sam", {"rho": 0.1}), SAM)

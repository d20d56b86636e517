"""SNGP head (Liu et al., NeurIPS 2020, "Simple and Principled Uncertainty Estimation with Deterministic Deep
Learning via Distance Awareness"): a classifier's output layer replaced by a Gaussian process on random Fourier
features, read through spectrally normalised hidden layers, with a Laplace posterior covariance.

The head (`SNGPHead`, in place of the classifier's last nn.Linear):
    h = x + relu(SN(W) x + b)                     residual hidden layer, ||SN(W)||_2 <= norm_bound < 1, so h is
                                                  bi-Lipschitz in x: distances are neither blown up nor collapsed
    z = LayerNorm(h)                              (no affine: the kernel's lengthscale stays what was asked)
    phi = cos(z @ Omega + b_rff)                  Omega ~ N(0, 1/lengthscale^2), b_rff ~ U(0, 2 pi), fixed
    logits_MAP = phi @ beta                       beta trained; no bias: the GP's mean is 0
The other nn.Linear layers of the new head (RoBERTa's classifier.dense, DistilBERT's pre_classifier) get the same
spectral bound (`bound_head_layers`).

Covariance: the Laplace approximation with a Gaussian likelihood, one precision matrix for all classes, as the
reference implementations (edward2's LaplaceRandomFeatureCovariance default, DUE): P = ridge * I + sum_i s_i
s_i^T over the training rows (the exact sum, edward2's momentum -1), s = sqrt(2/D) phi the random features of
Rahimi & Recht, whose inner products approximate the RBF kernel itself (prior variance s^T s = 1). We take that
sum in one extra pass over the training rows after the last step, in eval mode, with the final weights
(`fit_precision`), rather than during the final epoch's forwards: several regularizers run more than one forward
per step (perturbed, mixed, or SAM's second pass), which would add rows that are not training rows, and the
features move during that epoch.
Predictive variance var(x) = ridge * s^T P^-1 s (the GP's posterior variance with noise variance `ridge`; far
from the training rows it tends to the prior's s^T s = 1), and the mean-field logits (Lu et al. 2020) are
logits_MAP / sqrt(1 + mean_field_factor * var), mean_field_factor pi/8 as in the paper. In training mode the head
returns the MAP logits; in eval mode, once fitted, the mean-field logits; unfitted, the MAP logits.

The logits are phi @ beta with the unscaled phi: the same function as s @ (sqrt(D/2) beta), a parametrisation
of the output weights whose gradient steps are not sqrt(D/2) times smaller (edward2 leaves its output layer's
features unscaled for that reason). The covariance is the scaled features' (unit prior variance); with the
unscaled ones (prior variance D/2 = 512) the mean-field shrank in-distribution logits about 6x (measured, BBC
News, docs/tuning.md).

Saving and loading: the head's parameters and buffers (Omega, b_rff, the inverse precision P^-1) are in the
model's state dict, so `save_pretrained` writes them into model.safetensors; `sngp.json` beside it says where the
head sits and its settings. `load_sngp_classifier(folder)` rebuilds the classifier from config.json, installs the
head and loads every tensor (strict): the reloaded model's eval-mode logits are the mean-field logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

SNGP_FILE = "sngp.json"
INIT_POWER_ITERATIONS = 15  # as torch's spectral_norm at registration: a good estimate from the first step on
# After training, before the covariance is fitted: one iteration per step lags behind a weight that moves fast
# (measured: a layer trained at lr 0.05 read 1.11 for a bound of 0.95); warm-started, 100 more settle it.
SETTLE_POWER_ITERATIONS = 100


class BoundedSpectralNorm(nn.Module):
    """A parametrization W -> W / max(1, sigma(W) / bound) (the paper's soft bound: W is rescaled only when its
    spectral norm exceeds `bound`). sigma is estimated by power iteration, one step per training forward (the
    paper's), its vectors kept as buffers (saved and resumed with the model); `settle` iterates it to convergence
    for the weights a finished model keeps."""

    def __init__(self, weight: Tensor, bound: float, eps: float = 1e-12) -> None:
        super().__init__()
        self.bound, self.eps = float(bound), eps
        rows, cols = weight.shape
        generator = torch.Generator().manual_seed(0)  # the estimate's start: not the run's random stream
        self.register_buffer("u", F.normalize(torch.randn(rows, generator=generator), dim=0, eps=eps).to(weight))
        self.register_buffer("v", F.normalize(torch.randn(cols, generator=generator), dim=0, eps=eps).to(weight))
        self._power_iteration(weight.detach(), INIT_POWER_ITERATIONS)

    @torch.no_grad()
    def _power_iteration(self, weight: Tensor, steps: int) -> None:
        for _ in range(steps):
            self.v.copy_(F.normalize(weight.t().mv(self.u), dim=0, eps=self.eps))
            self.u.copy_(F.normalize(weight.mv(self.v), dim=0, eps=self.eps))

    def settle(self, weight: Tensor) -> None:
        self._power_iteration(weight.detach(), SETTLE_POWER_ITERATIONS)

    def sigma(self, weight: Tensor) -> Tensor:
        # u, v cloned: a later forward (a regularizer's second pass) updates the buffers in place before this
        # forward's backward
        return torch.dot(self.u.clone(), weight.mv(self.v.clone()))

    def forward(self, weight: Tensor) -> Tensor:
        if self.training:
            self._power_iteration(weight.detach(), 1)
        return weight / torch.clamp(self.sigma(weight) / self.bound, min=1.0)


def bound_spectral_norm(linear: nn.Linear, bound: float) -> nn.Linear:
    """Register BoundedSpectralNorm on `linear.weight` (torch.nn.utils.parametrize); returns the layer."""
    parametrize.register_parametrization(linear, "weight", BoundedSpectralNorm(linear.weight, bound))
    return linear


class SNGPHead(nn.Module):
    """The output layer: residual SN hidden layer, random Fourier features, GP output (see the module docstring)."""

    def __init__(self, in_features: int, num_labels: int, settings: dict[str, Any]) -> None:
        super().__init__()
        self.settings = dict(settings)
        features = int(settings["random_features"])
        lengthscale = settings.get("lengthscale") or math.sqrt(in_features)
        self.ridge, self.mean_field_factor = float(settings["ridge"]), float(settings["mean_field_factor"])
        self.hidden = bound_spectral_norm(nn.Linear(in_features, in_features), settings["norm_bound"])
        self.norm = nn.LayerNorm(in_features, elementwise_affine=False)
        # Omega and b_rff are drawn from torch's generator, seeded by the loop before the head is built
        self.register_buffer("omega", torch.randn(in_features, features) / float(lengthscale))
        self.register_buffer("phase", torch.rand(features) * (2 * math.pi))
        self.amplitude = math.sqrt(2.0 / features)  # s = amplitude * phi: Rahimi & Recht's RBF features
        self.output = nn.Linear(features, num_labels, bias=False)
        nn.init.normal_(self.output.weight, std=0.01)  # the reference port's gp_output_init_std
        # P is needed only to fit; the checkpoint keeps P^-1
        self.register_buffer("precision", self.ridge * torch.eye(features, dtype=torch.float64), persistent=False)
        self.register_buffer("covariance", torch.eye(features, dtype=torch.float64))  # P^-1, once fitted
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.collecting = False  # fit_precision's pass: eval-mode forwards add their rows to the precision

    def random_features(self, x: Tensor) -> Tensor:
        x = x.to(self.omega.dtype)
        hidden = x + F.relu(self.hidden(x))
        return torch.cos(self.norm(hidden) @ self.omega + self.phase)

    def variance(self, phi: Tensor) -> Tensor:
        """ridge * s^T P^-1 s per row (float64), s = amplitude * phi."""
        scaled = self.amplitude * phi.double()
        return self.ridge * ((scaled @ self.covariance) * scaled).sum(-1)

    def forward(self, x: Tensor) -> Tensor:
        phi = self.random_features(x)
        logits = self.output(phi)
        if self.collecting:
            with torch.no_grad():
                scaled = self.amplitude * phi.detach().double()
                self.precision += scaled.t() @ scaled
        if self.training or not bool(self.fitted):
            return logits
        scale = torch.sqrt(1.0 + self.mean_field_factor * self.variance(phi.detach()))
        return logits / scale.to(logits.dtype).unsqueeze(-1)

    def reset_precision(self) -> None:
        self.precision.copy_(self.ridge * torch.eye(self.precision.shape[0], dtype=torch.float64,
                                                    device=self.precision.device))
        self.fitted.fill_(False)

    def finish_precision(self) -> None:
        """P^-1 by Cholesky (P is ridge * I plus a Gram matrix: positive definite)."""
        factor = torch.linalg.cholesky(self.precision)
        self.covariance.copy_(torch.cholesky_inverse(factor))
        self.fitted.fill_(True)


def sngp_heads(model: nn.Module) -> list[SNGPHead]:
    return [m for m in model.modules() if isinstance(m, SNGPHead)]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def output_layer_name(model: nn.Module, num_labels: int) -> str:
    """The module name of the classifier's last nn.Linear with num_labels outputs, outside the backbone."""
    from workers.features.adapters import classifier_layer

    layer = classifier_layer(model, num_labels)
    if layer is None:
        raise ValueError("tune.head: this model's head has no linear output layer to replace with a GP")
    return next(name for name, m in model.named_modules() if m is layer)


def install_sngp_head(model: nn.Module, settings: dict[str, Any], num_labels: int) -> dict[str, Any]:
    """Replace the output layer of `model` by an SNGPHead and bound the head's other linear layers; what was done
    (written to sngp.json)."""
    name = output_layer_name(model, num_labels)
    layer = model.get_submodule(name)
    parent, child = _parent(model, name)
    head = SNGPHead(layer.in_features, num_labels, settings).to(layer.weight.device)
    setattr(parent, child, head)
    bounded = bound_head_layers(model, settings["norm_bound"])
    return {"output_layer": name, "in_features": layer.in_features, "num_labels": num_labels,
            "bounded_layers": bounded, "settings": dict(settings),
            "lengthscale": float(settings.get("lengthscale") or math.sqrt(layer.in_features))}


def bound_head_layers(model: nn.Module, bound: float) -> list[str]:
    """Spectral bound on the new head's other nn.Linear layers (outside the backbone, not the SNGP head's own)."""
    from workers.features.adapters import backbone

    base = backbone(model)
    inside = {id(m) for m in base.modules()} if base is not model else set()
    for head in sngp_heads(model):
        inside |= {id(m) for m in head.modules()}
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear and id(m) not in inside]
    for name in names:
        bound_spectral_norm(model.get_submodule(name), bound)
    return names


@torch.no_grad()
def fit_precision(model: nn.Module, batches: Any, device: torch.device, batch_size: int, task: str,
                  autocast: Any) -> int:
    """Settle the spectral bounds, then P = ridge * I + sum s s^T over every row of `batches` (the training
    rows), eval mode; then P^-1. The number of rows read."""
    from workers.tuning.batches import model_inputs

    heads = sngp_heads(model)
    was_training = model.training
    settle_spectral_norms(model)
    model.eval()
    for head in heads:
        head.reset_precision()
        head.collecting = True
    try:
        for start in range(0, len(batches), batch_size):
            index = torch.arange(start, min(len(batches), start + batch_size))
            with autocast():
                model(**model_inputs(batches.batch(index, device, task)))
    finally:
        for head in heads:
            head.collecting = False
    for head in heads:
        head.finish_precision()
    model.train(was_training)
    return len(batches)


def _bounded(model: nn.Module) -> list[tuple[str, nn.Module, BoundedSpectralNorm]]:
    out = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            out += [(name, module, p) for p in module.parametrizations["weight"] if isinstance(p, BoundedSpectralNorm)]
    return out


def settle_spectral_norms(model: nn.Module) -> None:
    """Power-iterate every bound's estimate to convergence (see SETTLE_POWER_ITERATIONS)."""
    for _, module, bound in _bounded(model):
        bound.settle(module.parametrizations["weight"].original)


def spectral_norms(model: nn.Module) -> dict[str, float]:
    """The exact largest singular value of every spectrally bounded weight as the model uses it."""
    return {name: float(torch.linalg.matrix_norm(module.weight.detach().double(), ord=2))
            for name, module, _ in _bounded(model)}


def write_sngp_config(folder: Path, description: dict[str, Any], modality: str) -> None:
    (Path(folder) / SNGP_FILE).write_text(json.dumps({**description, "modality": modality}, indent=2))


def load_sngp_classifier(folder: Path | str, base: Path | str | None = None) -> nn.Module:
    """The SNGP classifier saved in `folder` (a HubTune checkpoint with sngp.json), offline, in eval mode: its
    logits are the mean-field logits, softmax gives the calibrated probabilities (`predict_proba`).

    A LoRA checkpoint (adapter_config.json) is loaded onto its base: `base` (the pretrained model's folder), else
    the folder adapter_config.json names (`<checkpoint>.base` on the worker); the result is a peft PeftModel."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification

    folder = Path(folder)
    description = json.loads((folder / SNGP_FILE).read_text())
    config = AutoConfig.from_pretrained(folder)
    auto = AutoModelForImageClassification if description.get("modality") == "image" else \
        AutoModelForSequenceClassification
    if (folder / "adapter_config.json").exists():
        from peft import PeftConfig, PeftModel

        base = base or PeftConfig.from_pretrained(folder).base_model_name_or_path
        model = auto.from_pretrained(base, config=config, dtype=torch.float32)  # its linear head is replaced
        install_sngp_head(model, description["settings"], description["num_labels"])
        return PeftModel.from_pretrained(model, folder).eval()
    model = auto.from_config(config).to(torch.float32)
    install_sngp_head(model, description["settings"], description["num_labels"])
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    return model.eval()


def predict_proba(model: nn.Module, **inputs: Tensor) -> Tensor:
    """Calibrated class probabilities: softmax of the eval-mode (mean-field) logits."""
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(**inputs).logits.float(), dim=-1)

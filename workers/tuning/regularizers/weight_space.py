"""Pieces that keep the weights near where they started: L2-SP (a penalty toward w0), Mixout (mixing weights back
to w0), regularized self-labeling (projection onto balls around w0, with reweighted and corrected labels).

With LoRA adapters (workers/tuning/adapters.py) the base weights are frozen at w0, so w - w0 is each adapted
layer's update s B A: L2-SP penalises ||s B A||^2, self-labeling bounds ||s B A||_F by scaling B, and Mixout,
which has no fine-tuned weight to mix back, refuses (so does the contract)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.tuning.regularizers.anatomy import (
    backbone_and_head,
    backbone_module,
    delta_weight,
    layer_depth,
    lora_layers,
    scale_update,
    set_dropout,
    transformer_layers,
)
from workers.tuning.regularizers.base import Regularizer, SetupInfo, StepContext

# ------------------------------------------------------------------------------------------------------- L2-SP


class L2SP(Regularizer):
    """alpha/2 * ||w - w0||^2 over the backbone + beta/2 * ||w||^2 over the head (Li et al. 2018; TLlib)."""

    name = "l2sp"

    def __init__(self, alpha: float = 0.01, beta: float = 0.01) -> None:
        super().__init__(alpha=alpha, beta=beta)
        self.alpha, self.beta = alpha, beta
        self._backbone: list[tuple[nn.Parameter, Tensor]] = []
        self._head: list[nn.Parameter] = []
        self._adapted: list[nn.Module] = []  # LoRA layers: w - w0 is their update

    def setup(self, model: nn.Module, info: SetupInfo | None = None) -> None:
        backbone, head = backbone_and_head(model)
        self._adapted = [m for _, m in lora_layers(model)]
        self._backbone = [(p, p.detach().clone()) for n, p in backbone if p.requires_grad and "lora_" not in n]
        self._head = [p for _, p in head if p.requires_grad]

    def penalty(self) -> Tensor:
        some = [p for p, _ in self._backbone[:1]] + self._head[:1] + [m.lora_B[n].weight for m in self._adapted[:1]
                                                                       for n in m.active_adapters]
        total = torch.zeros((), device=some[0].device)
        if self.alpha:
            total = total + 0.5 * self.alpha * sum(((p - p0) ** 2).sum() for p, p0 in self._backbone)
            if self._adapted:
                total = total + 0.5 * self.alpha * sum((delta_weight(m).float() ** 2).sum() for m in self._adapted)
        if self.beta and self._head:
            total = total + 0.5 * self.beta * sum((p ** 2).sum() for p in self._head)
        return total

    def extra_loss(self, ctx: StepContext) -> Tensor:
        return self.penalty()


# ------------------------------------------------------------------------------------------------------ Mixout


class MixLinear(nn.Linear):
    """nn.Linear whose weight is mixed back to w0 in training (Lee et al. 2020):

        W = ((1 - M) * w0 + M * w - p * w0) / (1 - p),  M ~ Bernoulli(1 - p) per input column (as the reference
        draws one mask row and repeats it over the output rows); p = 1 gives w0, p = 0 gives w; E[W] = w.
    The weight and bias Parameters are the wrapped Linear's own (the optimizer's references stay valid); w0 is a
    non-persistent buffer, so state dicts look like the plain Linear's. In eval mode it is the plain Linear.
    """

    def __init__(self, linear: nn.Linear, p: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("w0", linear.weight.detach().clone(), persistent=False)
        self.p = float(p)

    def mixed_weight(self) -> Tensor:
        if not self.training or self.p == 0.0:
            return self.weight
        if self.p == 1.0:
            return self.w0 + 0.0 * self.weight  # keeps the graph; the gradient to w is zero
        keep = torch.empty(self.in_features, device=self.weight.device).bernoulli_(1.0 - self.p)
        keep = keep.to(self.weight.dtype).unsqueeze(0)  # (1, in): one mask per input column
        return ((1.0 - keep) * self.w0 + keep * self.weight - self.p * self.w0) / (1.0 - self.p)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.mixed_weight(), self.bias)

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight = self.weight
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mixout={self.p}"


class Mixout(Regularizer):
    """Replace every backbone nn.Linear by a MixLinear mixing toward its pretrained weight; the new head is left
    as it is (it has no pretrained weight). Backbone dropout is turned off by default (reference HF example)."""

    name = "mixout"

    def __init__(self, p: float = 0.7, disable_dropout: bool = True) -> None:
        super().__init__(p=p, disable_dropout=disable_dropout)
        self.p, self.disable_dropout = p, disable_dropout
        self._dropout: dict[nn.Dropout, float] = {}

    def setup(self, model: nn.Module, info: SetupInfo | None = None) -> None:
        if lora_layers(model):
            raise ValueError("regularizer: mixout cannot be combined with peft (LoRA freezes the pretrained weights "
                             "it mixes back to)")
        root = backbone_module(model)
        targets = [(name, m) for name, m in root.named_modules() if type(m) is nn.Linear]
        for name, linear in targets:
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            setattr(parent, child, MixLinear(linear, self.p))
        if self.disable_dropout:
            set_dropout(root, 0.0, self._dropout)

    def teardown(self, model: nn.Module) -> None:
        root = backbone_module(model)
        for name, module in list(root.named_modules()):
            if isinstance(module, MixLinear):
                parent_name, _, child = name.rpartition(".")
                parent = root.get_submodule(parent_name) if parent_name else root
                setattr(parent, child, module.to_linear())
        set_dropout(root, None, self._dropout)



# ---------------------------------------------------------------------------------- regularized self-labeling


def project_frobenius(w: Tensor, center: Tensor | None, radius: float) -> Tensor:
    """The point of the ball ||w - center||_F <= radius closest to w (radial scaling, as the repo's constraint)."""
    diff = w if center is None else w - center
    norm = diff.norm()
    if norm <= radius:
        return w
    scaled = diff * (radius / norm)
    return scaled if center is None else center + scaled


class SelfLabeling(Regularizer):
    """Regularized self-labeling (Li & Zhang, NeurIPS 2021; VirtuosoResearch/Regularized-Self-Labeling):

    - after every step, each weight matrix W of backbone depth l is projected onto ||W - W0||_F <= D_l with
      D_l = radius * growth^l (* ||W0||_F when relative), depth 0 the embeddings, i+1 Transformer layer i; the
      head's matrices onto ||W||_F <= head_radius. Biases and norm weights are not constrained (as the repo).
    - from `reweight_start` of training, the batch loss is sum_i w_i loss_i, w = softmax(-loss / T) over the batch,
      T = temperature * max(0.5, exp(-3 (progress - reweight_start))) (the repo's 0.1 per epoch over 30 epochs).
    - from `relabel_start`, an example's stored label becomes the model's prediction when its top probability
      exceeds `threshold` and disagrees (classification). The corrected labels survive a resume (state_dict).
    """

    name = "self_labeling"

    def __init__(self, radius: float = 0.05, growth: float = 1.2, relative: bool = True, head_radius: float = 10.0,
                 temperature: float = 2.0, threshold: float = 0.9, reweight_start: float = 1 / 6,
                 relabel_start: float = 1 / 3) -> None:
        super().__init__(radius=radius, growth=growth, relative=relative, head_radius=head_radius,
                         temperature=temperature, threshold=threshold, reweight_start=reweight_start,
                         relabel_start=relabel_start)
        self.radius, self.growth, self.relative = radius, growth, relative
        self.head_radius, self.temperature, self.threshold = head_radius, temperature, threshold
        self.reweight_start, self.relabel_start = reweight_start, relabel_start
        self.constraints: list[tuple[str, nn.Parameter, Tensor | None, float]] = []  # name, W, W0, bound
        self.adapted: list[tuple[str, nn.Module, float]] = []  # LoRA layers: ||s B A||_F <= bound
        self.labels: Tensor | None = None
        self.task = "classification"
        self.changed = 0

    def setup(self, model: nn.Module, info: SetupInfo | None = None) -> None:
        backbone, head = backbone_and_head(model)
        try:
            num_layers = len(transformer_layers(model))
        except ValueError:
            num_layers = max([layer_depth(n, 0) for n, _ in backbone] + [0])
        self.constraints = []
        self.adapted = []
        for name, layer in lora_layers(model):
            bound = self.radius * self.growth ** layer_depth(name + ".", num_layers)
            if self.relative:
                bound *= float(layer.get_base_layer().weight.detach().norm())
            self.adapted.append((name, layer, bound))
        for name, p in backbone:
            if p.dim() != 2 or not p.requires_grad or "lora_" in name:
                continue
            bound = self.radius * self.growth ** layer_depth(name, num_layers)
            w0 = p.detach().clone()
            if self.relative:
                bound *= float(w0.norm())
            self.constraints.append((name, p, w0, bound))
        for name, p in head:
            if p.dim() == 2 and p.requires_grad:
                self.constraints.append((name, p, None, self.head_radius))
        if info is not None:
            self.task = info.task
            if info.train_labels is not None and info.task == "classification":
                self.labels = info.train_labels.detach().clone().long()

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        for _, p, w0, bound in self.constraints:
            p.copy_(project_frobenius(p, w0, bound))
        for _, layer, bound in self.adapted:  # the projection of w0 + s B A onto the ball: B scaled radially
            norm = float(delta_weight(layer).norm())
            if norm > bound:
                scale_update(layer, bound / norm)

    def current_temperature(self, progress: float) -> float:
        return self.temperature * max(0.5, math.exp(-3.0 * max(0.0, progress - self.reweight_start)))

    def example_weights(self, ctx: StepContext, losses: Tensor) -> Tensor | None:
        if ctx.progress < self.reweight_start:
            return None
        return torch.softmax(-losses.detach().float() / self.current_temperature(ctx.progress), dim=0)

    @torch.no_grad()
    def relabel(self, ctx: StepContext, labels: Tensor) -> Tensor:
        if self.labels is None or self.task != "classification" or "index" not in ctx.batch:
            return labels
        if self.labels.device != labels.device:
            self.labels = self.labels.to(labels.device)
        index = ctx.batch["index"]
        if ctx.progress >= self.relabel_start and ctx.logits is not None:
            conf, pred = torch.softmax(ctx.logits.detach().float(), -1).max(-1)
            change = (conf > self.threshold) & (pred != self.labels[index])
            self.labels[index[change]] = pred[change]
            self.changed += int(change.sum())
        return self.labels[index]

    def state_dict(self) -> dict[str, Any]:
        return {"labels": None if self.labels is None else self.labels.cpu(), "changed": self.changed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("labels") is not None:
            self.labels = state["labels"].clone()
        self.changed = int(state.get("changed", 0))

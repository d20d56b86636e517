"""Sharpness-aware minimisation: SAM (Foret et al., ICLR 2021) and its adaptive variant ASAM (Kwon et al., ICML
2021). The step's gradient is taken at the worst nearby weights instead of at the weights themselves:

    e = rho * T^2 g / ||T g||,   g = grad L(w),   T = 1 (SAM) or diag(|w| + eta) on weights, 1 on biases (ASAM)
    w <- w - lr * step(grad L(w + e))

so ||T^-1 e|| = rho: SAM's ball is Euclidean, ASAM's is scaled per coordinate by the weight's own size (which makes
the sharpness it sees invariant to rescaling a layer). L is the step's whole loss, the other pieces' terms included
(the loop recomputes it at w + e), so SAM composes with them as the other pieces do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from workers.tuning.regularizers.base import Regularizer


def _scale(name: str, p: Tensor, adaptive: bool, eta: float) -> Tensor | float:
    """T of one parameter: ASAM's |w| + eta on weights (the official code's 'weight' in the name); 1 otherwise."""
    if adaptive and "weight" in name:
        return p.detach().abs().add(eta)
    return 1.0


@torch.no_grad()
def sam_perturbation(named: list[tuple[str, nn.Parameter]], rho: float, adaptive: bool = False,
                     eta: float = 0.01) -> list[Tensor]:
    """e for each parameter of `named` that has a gradient (zeros for those without), from the gradients there."""
    scales = [_scale(n, p, adaptive, eta) for n, p in named]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in named]
    norm = torch.sqrt(sum(((t * g).float() ** 2).sum() for t, g in zip(scales, grads, strict=True)))
    factor = rho / (norm + 1e-12)
    return [(t * t * g * factor).to(p.dtype) for t, g, (_, p) in zip(scales, grads, named, strict=True)]


class SAM(Regularizer):
    """After the backward pass: move the weights to w + e, recompute the step's loss and its gradient there, and
    put the weights back exactly (a saved copy, not w + e - e) before the optimiser steps with that gradient."""

    name = "sam"

    def __init__(self, rho: float = 0.05, adaptive: bool = False, eta: float = 0.01) -> None:
        super().__init__(rho=rho, adaptive=adaptive, eta=eta)
        self.rho, self.adaptive, self.eta = rho, adaptive, eta
        self.increase, self.steps = 0.0, 0  # sum of L(w + e) - L(w): the sharpness the steps saw

    def after_backward(self, model: nn.Module, loss: Tensor, recompute: Callable[[], Tensor]) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
        if not named or self.rho == 0.0:
            return
        perturbation = sam_perturbation(named, self.rho, self.adaptive, self.eta)
        saved = [p.detach().clone() for _, p in named]
        with torch.no_grad():
            for (_, p), e in zip(named, perturbation, strict=True):
                p.add_(e)
        try:
            perturbed = recompute()
        finally:
            with torch.no_grad():
                for (_, p), w in zip(named, saved, strict=True):
                    p.copy_(w)
        self.increase += float(perturbed) - float(loss.detach())
        self.steps += 1

    def describe(self) -> dict[str, Any]:
        return {"rho": self.rho, "adaptive": self.adaptive,
                "mean_loss_increase": self.increase / self.steps if self.steps else None}

    def state_dict(self) -> dict[str, Any]:
        return {"increase": self.increase, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.increase, self.steps = float(state.get("increase", 0.0)), int(state.get("steps", 0))

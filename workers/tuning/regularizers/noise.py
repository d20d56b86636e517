"""Pieces that put noise into hidden states: LNSR (a penalty on how far noise at one layer moves the later ones),
HyPe (noise at every layer's input), noisy feature mixup (mixed and noised hidden states, mixed targets)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.tuning.regularizers.anatomy import first_tensor, layer_input_hook, set_dropout, transformer_layers
from workers.tuning.regularizers.base import Regularizer, SetupInfo, StepContext, per_example_loss

# ------------------------------------------------------------------------------------ hidden-state perturbations


class LNSR(Regularizer):
    """Layer-wise noise stability regularization (Hua et al. 2021): add Gaussian noise of std sigma to the input
    of Transformer layer `layer` and penalise sum_j lambda_j * mean over tokens ||f_j(h + noise) - f_j(h)||^2 over
    the outputs f_j of that layer and every later one, lambda_j = lam / (number of such layers). The clean
    outputs come from the step's main forward; the noisy pass replays its dropout masks."""

    name = "lnsr"

    def __init__(self, lam: float = 1.0, sigma: float = 0.05, layer: int = 0) -> None:
        super().__init__(lam=lam, sigma=sigma, layer=layer)
        self.lam, self.sigma, self.layer = lam, sigma, int(layer)
        self._handles: list[Any] = []
        self._outputs: dict[int, Tensor] = {}
        self._noise: Tensor | None = None
        self._input_shape: torch.Size | None = None

    def setup(self, model: nn.Module, info: SetupInfo | None = None) -> None:
        layers = transformer_layers(model)
        if self.layer >= len(layers):
            raise ValueError(f"regularizer.params.layer: {self.layer} >= the model's {len(layers)} layers")

        def add_noise(h: Tensor) -> Tensor:
            if self._noise is None:
                self._input_shape = h.shape  # the clean pass: the noise is drawn in this shape (a strided CNN
                return h  # block's input is larger than its output)
            return h + self._noise.to(h.dtype)

        self._handles.append(layers[self.layer].register_forward_pre_hook(layer_input_hook(add_noise),
                                                                          with_kwargs=True))
        for j in range(self.layer, len(layers)):
            def record(module: nn.Module, args: tuple, output: Any, j: int = j) -> None:
                if module.training and torch.is_grad_enabled():
                    self._outputs[j] = first_tensor(output)
            self._handles.append(layers[j].register_forward_hook(record))

    def penalty(self, clean: dict[int, Tensor], noisy: dict[int, Tensor], mask: Tensor | None) -> Tensor:
        """sum_j lambda_j * mean over positions of the squared change of each position's vector: tokens (B, L, H)
        under the attention mask, or a CNN's feature maps (B, C, H, W) over their H x W positions (mask None)."""
        weight = self.lam / max(1, len(clean))
        total = torch.zeros((), device=next(iter(clean.values())).device)
        for j, h in clean.items():
            diff = noisy[j].float() - h.float()
            if diff.dim() == 4:
                total = total + weight * (diff ** 2).sum(1).mean()
                continue
            sq = (diff ** 2).sum(-1)  # (B, L)
            m = torch.ones_like(sq) if mask is None or mask.shape != sq.shape else mask.to(torch.float32)
            total = total + weight * (sq * m).sum() / m.sum().clamp_min(1.0)
        return total

    def extra_loss(self, ctx: StepContext) -> Tensor:
        clean = dict(self._outputs)
        if not clean:
            raise RuntimeError("lnsr: the clean forward recorded no layer outputs (model not in train mode?)")
        # Drawn before the replayed forward so the noisy pass consumes the random stream exactly as the clean one
        # did (same dropout masks everywhere).
        like = clean[self.layer]
        shape = self._input_shape or like.shape
        self._noise = torch.randn(shape, dtype=torch.float32, device=like.device) * self.sigma
        try:
            ctx.forward()
        finally:
            self._noise = None
        noisy = dict(self._outputs)
        self._outputs.clear()
        return self.penalty(clean, noisy, None if ctx.is_image else ctx.mask)

    def teardown(self, model: nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()


class HyPe(Regularizer):
    """Hidden representation perturbation (Yuan et al. 2023): in training only, add eps * U(0, 1) (the official
    code's `uniform_()`) or eps * N(0, 1) noise to every Transformer layer's input; no extra loss; dropout off."""

    name = "hype"
    needs_fp32 = True

    def __init__(self, eps: float = 1e-5, noise: str = "uniform", disable_dropout: bool = True) -> None:
        super().__init__(eps=eps, noise=noise, disable_dropout=disable_dropout)
        self.eps, self.noise, self.disable_dropout = eps, noise, disable_dropout
        self._handles: list[Any] = []
        self._dropout: dict[nn.Dropout, float] = {}

    def setup(self, model: nn.Module, info: SetupInfo | None = None) -> None:
        for layer in transformer_layers(model):
            def perturb(h: Tensor, layer: nn.Module = layer) -> Tensor:
                if not layer.training:
                    return h
                noise = torch.rand_like(h) if self.noise == "uniform" else torch.randn_like(h)
                return h + self.eps * noise
            self._handles.append(layer.register_forward_pre_hook(layer_input_hook(perturb), with_kwargs=True))
        if self.disable_dropout:
            set_dropout(model, 0.0, self._dropout)

    def teardown(self, model: nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        set_dropout(model, None, self._dropout)


# ---------------------------------------------------------------------------------------- noisy feature mixup


def noisy_mixup(x: Tensor, lam: float, index: Tensor, add_noise: float = 0.0, mult_noise: float = 0.0
                ) -> Tensor:
    """lam * x + (1 - lam) * x[index], then NFM's noise: * (1 + mult * Beta(2,5) * U(-1, 1)) and
    + add * Beta(2,5) * rms(x) * N(0, 1) (erichson/NFM `_noise`, with the additive level in units of rms(x))."""
    mixed = lam * x + (1.0 - lam) * x[index]
    beta25 = torch.distributions.Beta(torch.tensor(2.0), torch.tensor(5.0))
    if mult_noise > 0:
        level = mult_noise * float(beta25.sample())
        mixed = mixed * (1.0 + level * (2.0 * torch.rand_like(mixed) - 1.0))
    if add_noise > 0:
        level = add_noise * float(beta25.sample())
        rms = x.detach().float().pow(2).mean().sqrt().to(x.dtype)
        mixed = mixed + level * rms * torch.randn_like(mixed)
    return mixed


def mix_targets(labels: Tensor, lam: float, index: Tensor, task: str, num_classes: int | None = None) -> Tensor:
    """The mixed targets lam * y + (1 - lam) * y[index] (one-hot first for classification)."""
    if task == "classification":
        y = F.one_hot(labels.long(), num_classes).float()
    else:
        y = labels.float()
    return lam * y + (1.0 - lam) * y[index]


class NFM(Regularizer):
    """Noisy feature mixup (Lim et al. 2022): pick a layer k (the input of Transformer layer k, uniformly among
    all layers when manifold, else the embedding output), replace its input by noisy_mixup(h, lam, perm) with
    lam ~ Beta(alpha, alpha), and train on lam * loss(y) + (1 - lam) * loss(y[perm]). Mixed sequences attend
    to the union of both attention masks."""

    name = "nfm"

    def __init__(self, alpha: float = 1.0, add_noise: float = 0.4, mult_noise: float = 0.2,
                 manifold: bool = True) -> None:
        super().__init__(alpha=alpha, add_noise=add_noise, mult_noise=mult_noise, manifold=manifold)
        self.alpha, self.add_noise, self.mult_noise, self.manifold = alpha, add_noise, mult_noise, manifold
        self.last_lam: float | None = None
        self.last_index: Tensor | None = None
        self.last_layer: int | None = None

    def forward_loss(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        layers = transformer_layers(ctx.model)
        batch = ctx.labels.shape[0]
        lam = float(torch.distributions.Beta(torch.tensor(float(self.alpha)), torch.tensor(float(self.alpha)))
                    .sample()) if self.alpha > 0 else 1.0
        index = torch.randperm(batch).to(ctx.device)
        k = int(torch.randint(len(layers), ())) if self.manifold else 0
        self.last_lam, self.last_index, self.last_layer = lam, index, k

        def mix(h: Tensor) -> Tensor:
            return noisy_mixup(h, lam, index, self.add_noise, self.mult_noise)

        handle = layers[k].register_forward_pre_hook(layer_input_hook(mix), with_kwargs=True)
        try:
            mask = torch.maximum(ctx.mask, ctx.mask[index])
            logits, _ = ctx.forward(attention_mask=mask, replay=False)
        finally:
            handle.remove()
        ctx.logits = logits
        loss = (lam * per_example_loss(logits, ctx.labels, ctx.task).mean()
                + (1.0 - lam) * per_example_loss(logits, ctx.labels[index], ctx.task).mean())
        return logits, loss



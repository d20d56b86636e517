"""Adversarial and perturbation-consistency pieces on the input embeddings (images: the normalised pixels):
SMART, R3F, VAT, SiFT. Each reruns the forward on perturbed inputs with the clean pass's dropout masks."""

from __future__ import annotations

import torch
from torch import Tensor

from workers.tuning.regularizers.base import Regularizer, StepContext, kl_divergence, symmetric_kl

# --------------------------------------------------------------------------------- embedding-space perturbations


def _token_mask(ctx: StepContext, like: Tensor) -> Tensor:
    return ctx.mask.unsqueeze(-1).to(like.dtype)


def _normalise_per_token(g: Tensor, norm: str, eps: float = 1e-6) -> Tensor:
    if norm == "l2":
        return g / (g.norm(dim=-1, keepdim=True) + eps)
    return g / (g.abs().amax(-1, keepdim=True) + eps)


def _normalise_per_example(d: Tensor, mask: Tensor, eps: float = 1e-12) -> Tensor:
    d = d * mask
    norm = d.flatten(1).norm(dim=1).clamp_min(eps)
    return d / norm.view(-1, *([1] * (d.dim() - 1)))


class SMART(Regularizer):
    """Smoothness-inducing adversarial regularization (Jiang et al. 2020, as in mt-dnn's SmartPerturbation):
    delta0 ~ N(0, noise^2) on the input embeddings; one ascent step on KL(p(x) || p(x + delta)) normalised per
    token by its max-abs (or L2) norm; then lam * symKL(f(x + delta), f(x)). (mt-dnn restarts the ascent from the
    clean embedding, dropping delta0; we keep delta0 + step * direction, as the paper's algorithm writes it.)"""

    name = "smart"
    needs_fp32 = True

    def __init__(self, lam: float = 1.0, noise: float = 1e-5, step: float = 1e-5, norm: str = "inf") -> None:
        super().__init__(lam=lam, noise=noise, step=step, norm=norm)
        self.lam, self.noise, self.step, self.norm = lam, noise, step, norm

    grad_eps = 1e-6  # guard in the normalisation g / (max|g| + grad_eps), mt-dnn's adv_epsilon

    def perturbation(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """(delta0, delta): the initial noise and the perturbation after the ascent step."""
        assert ctx.embeds is not None and ctx.logits is not None
        mask = _token_mask(ctx, ctx.embeds)
        delta0 = (torch.randn_like(ctx.embeds) * self.noise * mask).requires_grad_(True)
        adv_logits, _ = ctx.forward(lambda e: e + delta0)
        adv = kl_divergence(ctx.logits.detach(), adv_logits, ctx.task)
        (grad,) = torch.autograd.grad(adv, delta0)
        if not torch.isfinite(grad).all():
            return delta0.detach(), delta0.detach()
        step = self.step * _normalise_per_token(grad, self.norm, self.grad_eps) * mask
        return delta0.detach(), (delta0 + step).detach()

    def extra_loss(self, ctx: StepContext) -> Tensor:
        _, delta = self.perturbation(ctx)
        adv_logits, _ = ctx.forward(lambda e: e + delta)
        return self.lam * symmetric_kl(adv_logits, ctx.logits, ctx.task)


class R3F(Regularizer):
    """Better fine-tuning by reducing representational collapse (Aghajanyan et al. 2021; fairseq rxf):
    lam * symKL(f(emb), f(emb + z)), z ~ U(-eps, eps) or N(0, eps^2), no ascent step."""

    name = "r3f"
    needs_fp32 = True

    def __init__(self, lam: float = 1.0, eps: float = 1e-5, noise: str = "uniform") -> None:
        super().__init__(lam=lam, eps=eps, noise=noise)
        self.lam, self.eps, self.noise = lam, eps, noise

    def extra_loss(self, ctx: StepContext) -> Tensor:
        assert ctx.embeds is not None and ctx.logits is not None
        if self.noise == "uniform":
            z = (torch.rand_like(ctx.embeds) * 2 - 1) * self.eps
        else:
            z = torch.randn_like(ctx.embeds) * self.eps
        z = z * _token_mask(ctx, z)
        noised, _ = ctx.forward(lambda e: e + z)
        return self.lam * symmetric_kl(noised, ctx.logits, ctx.task)


class VAT(Regularizer):
    """Virtual adversarial training (Miyato et al. 2018): d random with per-token norm xi; one power iteration
    g = grad_d KL(p(x) || p(x + d)); r_adv = eps * g / ||g|| per example over its unpadded tokens;
    loss lam * KL(p(x) || p(x + r_adv)) with p(x) held fixed."""

    name = "vat"
    needs_fp32 = True

    def __init__(self, lam: float = 1.0, xi: float = 1e-6, eps: float = 1.0) -> None:
        super().__init__(lam=lam, xi=xi, eps=eps)
        self.lam, self.xi, self.eps = lam, xi, eps

    def perturbation(self, ctx: StepContext) -> Tensor:
        assert ctx.embeds is not None and ctx.logits is not None
        mask = _token_mask(ctx, ctx.embeds)
        d = torch.randn_like(ctx.embeds)
        d = (self.xi * d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12) * mask).requires_grad_(True)
        probe, _ = ctx.forward(lambda e: e + d)
        dist = kl_divergence(ctx.logits.detach(), probe, ctx.task)
        (grad,) = torch.autograd.grad(dist, d)
        if not torch.isfinite(grad).all() or grad.abs().max() == 0:
            grad = d.detach()  # flat at this point: fall back to the random direction
        return (self.eps * _normalise_per_example(grad, mask)).detach()

    def extra_loss(self, ctx: StepContext) -> Tensor:
        r_adv = self.perturbation(ctx)
        adv_logits, _ = ctx.forward(lambda e: e + r_adv)
        return self.lam * kl_divergence(ctx.logits.detach(), adv_logits, ctx.task)


def _layer_norm_stats(e: Tensor, eps: float = 1e-7) -> tuple[Tensor, Tensor]:
    mean = e.mean(-1, keepdim=True)
    std = (e.var(-1, keepdim=True, unbiased=False) + eps).sqrt()
    return mean, std


class SiFT(Regularizer):
    """Scale-invariant fine-tuning (DeBERTa's sift.py): the perturbation lives in LayerNorm-normalised embedding
    coordinates, n = (e - mean) / std per token. delta0 ~ N(0, init^2) clipped to +-2*init; one ascent step
    delta = delta0 + step * g / max|g| per token, g = grad symKL(f(n + delta0), f(x)); loss lam * symKL(f(n +
    delta), f(x)). DeBERTa feeds n + delta into the embedding LayerNorm; to work on models without one, we map
    back to embedding units, e + std * delta (the same point when a LayerNorm follows)."""

    name = "sift"

    def __init__(self, lam: float = 5.0, step: float = 1e-4, init: float = 1e-2) -> None:
        super().__init__(lam=lam, step=step, init=init)
        self.lam, self.step, self.init = lam, step, init

    grad_eps = 1e-6  # guard in g / (grad_eps + max|g|), as sift.py

    def perturbation(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """(delta0, delta) in normalised units."""
        assert ctx.embeds is not None and ctx.logits is not None
        mask = _token_mask(ctx, ctx.embeds)
        _, std = _layer_norm_stats(ctx.embeds.float())
        std = std.to(ctx.embeds.dtype)
        delta0 = torch.randn_like(ctx.embeds).mul(self.init).clamp(-2 * self.init, 2 * self.init) * mask
        delta0.requires_grad_(True)
        pert, _ = ctx.forward(lambda e: e + std * delta0)
        (grad,) = torch.autograd.grad(symmetric_kl(pert, ctx.logits.detach(), ctx.task), delta0)
        if not torch.isfinite(grad).all():
            return delta0.detach(), delta0.detach()
        delta = delta0 + self.step * _normalise_per_token(grad, "inf", self.grad_eps) * mask
        return delta0.detach(), delta.detach()

    def extra_loss(self, ctx: StepContext) -> Tensor:
        _, delta = self.perturbation(ctx)
        _, std = _layer_norm_stats(ctx.embeds.float())
        std = std.to(ctx.embeds.dtype)
        pert, _ = ctx.forward(lambda e: e + std * delta)
        return self.lam * symmetric_kl(pert, ctx.logits, ctx.task)



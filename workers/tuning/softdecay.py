"""SoftDecay in fine-tuning: each sentence's last-layer token states, their singular value spectrum flattened
(workers/ranking/softdecay.py has the function, its source and our two choices), differentiably.

Where: a forward hook on the last Transformer block (anatomy.transformer_layers) replaces its output, per example,
by SoftDecay of the example's real-token rows (padding excluded, and left as it was), so what the classification head
and the pooler read is the transformed matrix, in training and in evaluation alike: the transform is part of the
tuned model (the paper's: in BERT's last layer, before its LayerNorm, kept at inference). A checkpoint carries
`softdecay.json`; `install_softdecay(model, read_softdecay_config(folder))` after loading puts it back.
alpha is fixed (the paper learns it from -0.2 with its own learning rate, 2e-3; one setting fewer here, and a
checkpoint is described by a number).

Why not torch.linalg.svd's backward: it divides by s_i^2 - s_j^2, which is 0 for repeated singular values (a
sentence's duplicate or zero rows, a clamped tail) and gives NaN gradients (measured: torch.eye, or a matrix with
zero rows). The transform is Y = c psi(Z Z^T) Z with Z the unit-RMS rows, psi(l) = max(f(sqrt l), 0) / sqrt l and
c = s_1 / f(s_1); psi of the symmetric Gram matrix has a stable derivative (Daleckii-Krein: divided differences
(psi(l_i) - psi(l_j)) / (l_i - l_j), psi'(l_i) where l_i = l_j), written out in `_GramFunction`. c reads only the
largest eigenvalue, whose gradient q_1 q_1^T needs no gap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from workers.ranking.softdecay import check_alpha
from workers.tuning.regularizers.anatomy import first_tensor, transformer_layers

SOFTDECAY_FILE = "softdecay.json"


def _f(s: Tensor, alpha: float) -> Tensor:
    """The soft-exponential's concave branch, clamped at 0 (see workers/ranking/softdecay.py)."""
    return torch.clamp(torch.log1p(-alpha * (s + alpha)) / -alpha, min=0.0)


def _psi(eigen: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """psi(l) = f(sqrt l) / sqrt l and its derivative, for eigenvalues l >= 0 of a Gram matrix (0 where f is
    clamped, which includes l = 0)."""
    s = eigen.clamp_min(0.0).sqrt()
    live = s > -alpha  # f(s) > 0 exactly there
    safe = torch.where(live, s, torch.ones_like(s))
    value = torch.where(live, _f(safe, alpha) / safe, torch.zeros_like(s))
    f_prime = 1.0 / (1.0 - alpha * (safe + alpha))
    # d/dl [f(s) / s] = (f'(s) s - f(s)) / s^2 * ds/dl, ds/dl = 1 / (2 s)
    slope = torch.where(live, (f_prime * safe - _f(safe, alpha)) / (2 * safe ** 3), torch.zeros_like(s))
    return value, slope


class _GramFunction(torch.autograd.Function):
    """psi(G) of a symmetric PSD matrix G = Q diag(l) Q^T, with the Daleckii-Krein derivative."""

    @staticmethod
    def forward(ctx: Any, gram: Tensor, alpha: float) -> Tensor:
        eigen, q = torch.linalg.eigh(gram)
        value, slope = _psi(eigen, alpha)
        ctx.save_for_backward(eigen, q, value, slope)
        return (q * value) @ q.transpose(-2, -1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        eigen, q, value, slope = ctx.saved_tensors
        gap = eigen.unsqueeze(-1) - eigen.unsqueeze(-2)
        close = gap.abs() <= 1e-9 * eigen.abs().max().clamp_min(1.0)
        divided = torch.where(close, (slope.unsqueeze(-1) + slope.unsqueeze(-2)) / 2,
                              (value.unsqueeze(-1) - value.unsqueeze(-2)) / torch.where(close, 1.0, gap))
        sym = (grad + grad.transpose(-2, -1)) / 2
        inner = q.transpose(-2, -1) @ sym @ q
        return q @ (divided * inner) @ q.transpose(-2, -1), None


def softdecay_torch(matrix: Tensor, alpha: float) -> Tensor:
    """SoftDecay of one matrix (rows x features), differentiable, as workers.ranking.softdecay.softdecay computes
    it (unit-RMS units, largest singular value kept, f clamped at 0); computed in float64, returned in its dtype."""
    alpha = check_alpha(alpha)
    if alpha == 0.0 or matrix.numel() == 0:
        return matrix
    m = matrix.to(torch.float64)
    rms = m.pow(2).mean().sqrt()
    if float(rms.detach()) == 0.0:
        return matrix
    z = m / rms
    wide = z.shape[0] <= z.shape[1]  # psi of the smaller Gram matrix: Y = c psi(Z Z^T) Z = c Z psi(Z^T Z)
    gram = z @ z.T if wide else z.T @ z
    top = torch.linalg.eigvalsh(gram)[-1].clamp_min(0.0).sqrt()
    scale = top / _f(top, alpha)  # top >= 1 > |alpha| at unit RMS, so f(top) > 0
    psi = _GramFunction.apply(gram, alpha)
    out = scale * (psi @ z if wide else z @ psi)
    return (out * rms).to(matrix.dtype)


def softdecay_tokens(hidden: Tensor, attention_mask: Tensor | None, alpha: float) -> Tensor:
    """(B, L, D) token states with each example's real-token rows (attention_mask 1) SoftDecay'd, padding rows as
    they were."""
    rows = []
    for index in range(hidden.shape[0]):
        states = hidden[index]
        if attention_mask is None:
            rows.append(softdecay_torch(states, alpha))
            continue
        keep = attention_mask[index].bool()
        if not keep.any():
            rows.append(states)
            continue
        rows.append(states.masked_scatter(keep.unsqueeze(-1), softdecay_torch(states[keep], alpha)))
    return torch.stack(rows)


class SoftDecayHook:
    """SoftDecay of the last Transformer block's output, installed on `model`; `remove()` takes it off. The
    attention mask is read from the model's own call (a pre-hook), so padding stays out of each SVD."""

    def __init__(self, model: nn.Module, alpha: float) -> None:
        self.alpha = check_alpha(alpha)
        self._mask: Tensor | None = None
        self._handles = [model.register_forward_pre_hook(self._remember_mask, with_kwargs=True),
                         transformer_layers(model)[-1].register_forward_hook(self._transform)]

    def _remember_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._mask = kwargs.get("attention_mask")

    def _transform(self, module: nn.Module, args: tuple, output: Any) -> Any:
        hidden = first_tensor(output)
        mask = self._mask if self._mask is not None and self._mask.shape == hidden.shape[:2] else None
        new = softdecay_tokens(hidden, mask, self.alpha)
        if isinstance(output, tuple):
            return (new,) + tuple(output[1:])
        if isinstance(output, list):
            return [new] + list(output[1:])
        return new

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def install_softdecay(model: nn.Module, settings: dict[str, Any] | None) -> SoftDecayHook | None:
    """Put SoftDecay ({"alpha": a}, from TuneSpec's `softdecay` or a checkpoint's softdecay.json) on `model`;
    None: nothing to install."""
    if settings is None:
        return None
    return SoftDecayHook(model, settings["alpha"])


def write_softdecay_config(folder: Path, settings: dict[str, Any]) -> None:
    (Path(folder) / SOFTDECAY_FILE).write_text(json.dumps({**settings, "where": "last Transformer layer's output, "
                                                           "per example, real tokens only"}, indent=2))


def read_softdecay_config(folder: Path | str) -> dict[str, Any] | None:
    """A checkpoint's SoftDecay settings; None for a checkpoint tuned without it."""
    path = Path(folder) / SOFTDECAY_FILE
    return json.loads(path.read_text()) if path.exists() else None

"""Torch (GPU) path for LogME: the heavy linear algebra on `device` in float64.

Only the Gram matrix, its eigendecomposition, the projections and the posterior means run in torch;
the solve over alpha/beta is O(k T) scalar work and stays in numpy (`logme_solvers.solve`), so both
backends converge to the same fixed point by the same code. This module depends on no other of
workers.ranking: logme.py calls it and hands it the rule of which sample directions to keep.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def _pick_device(device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def spectrum_torch(features: Any, y: np.ndarray, device: Any = None, class_labels: np.ndarray | None = None, *,
                   keep: Callable[[np.ndarray], np.ndarray]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(s, proj, yy, mode, n, d) as numpy, the arguments of logme.Spectrum, and the device tensors that
    `weights_torch` needs. class_labels (N,) ints: build the one-hot targets on the device (sends N ints, not
    N x C floats). keep: the mask of the eigen-directions of F F^T kept when N < D (logme.kept_sample_directions)."""
    dev = _pick_device(device)
    f = torch.as_tensor(features).to(device=dev, dtype=torch.float64)
    if f.ndim != 2 or f.shape[0] != y.shape[0]:
        raise ValueError(f"features {tuple(f.shape)} do not match {y.shape[0]} labels")
    if class_labels is not None:
        lab = torch.as_tensor(np.asarray(class_labels, dtype=np.int64), device=dev)
        yt = torch.nn.functional.one_hot(lab, y.shape[1]).to(torch.float64)
        yy = torch.bincount(lab, minlength=y.shape[1]).to(torch.float64)
    else:
        yt = torch.as_tensor(y, dtype=torch.float64, device=dev)
        yy = (yt * yt).sum(0)
    n, d = f.shape
    if n >= d:
        s, basis = torch.linalg.eigh(f.T @ f)
        s = s.clamp_min(0.0)
        proj = basis.T @ (f.T @ yt)
        mode = "gram_d"
    else:
        s, basis = torch.linalg.eigh(f @ f.T)
        s = s.clamp_min(0.0)
        kept = torch.as_tensor(keep(s.cpu().numpy()), device=dev)
        s, basis = s[kept], basis[:, kept]
        proj = basis.T @ yt
        yy = (proj * proj).sum(0)
        mode = "gram_n"
        n = int(kept.sum())
    parts = (s.cpu().numpy(), proj.cpu().numpy(), yy.cpu().numpy(), mode, n, d)
    return parts, (f, basis, proj, s)


def weights_torch(ctx: tuple[Any, ...], mode: str, lam: np.ndarray) -> np.ndarray:
    """Posterior means (T, D) at lam from the device tensors of `spectrum_torch`."""
    f, basis, proj, s = ctx
    lam_t = torch.as_tensor(lam, dtype=torch.float64, device=s.device)
    scaled = proj / (lam_t[None, :] + s[:, None])
    m = basis @ scaled if mode == "gram_d" else f.T @ (basis @ scaled)
    return m.T.cpu().numpy()

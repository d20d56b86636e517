"""Torch (GPU) path for LogME: the heavy linear algebra on `device` in float64.

Only the Gram matrix, its eigendecomposition, the projections and the posterior means run in torch;
the solve over alpha/beta is O(k T) scalar work and stays in numpy (`logme._solve`), so both
backends converge to the same fixed point by the same code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from workers.ranking.logme import _Spectrum, kept_sample_directions


def _pick_device(device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def spectrum_torch(features: Any, y: np.ndarray, device: Any = None, class_labels: np.ndarray | None = None):
    """class_labels (N,) ints: build the one-hot targets on the device (sends N ints, not N x C floats)."""
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
        keep = torch.as_tensor(kept_sample_directions(s.cpu().numpy()), device=dev)
        s, basis = s[keep], basis[:, keep]
        proj = basis.T @ yt
        yy = (proj * proj).sum(0)
        mode = "gram_n"
        n = int(keep.sum())
    sp = _Spectrum(s.cpu().numpy(), proj.cpu().numpy(), yy.cpu().numpy(), mode, n, d)
    return sp, (f, basis, proj, s)


def weights_torch(ctx, sp: _Spectrum, lam: np.ndarray) -> np.ndarray:
    f, basis, proj, s = ctx
    lam_t = torch.as_tensor(lam, dtype=torch.float64, device=s.device)
    scaled = proj / (lam_t[None, :] + s[:, None])
    m = basis @ scaled if sp.mode == "gram_d" else f.T @ (basis @ scaled)
    return m.T.cpu().numpy()

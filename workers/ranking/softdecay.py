"""SoftDecay (Yan, Gui, Li & He, "Addressing Token Uniformity in Transformers via Singular Value Transformation",
UAI 2022; code: github.com/hanqi-qi/tokenUni): flatten a representation matrix's singular value spectrum.

Transformer outputs are "uniform": a few singular directions carry almost all of a matrix of token (or sentence)
representations, the rest decay towards 0. SoftDecay keeps the singular vectors and maps each singular value through
the soft-exponential function's concave branch (alpha < 0),

    f(s) = -ln(1 - alpha (s + alpha)) / alpha = ln(1 + |alpha| s - alpha^2) / |alpha|,

then rescales so that the largest singular value is unchanged: s' = f(s) s_1 / f(s_1). f grows like a logarithm,
so small singular values are lifted relative to the largest: the spectrum's skew drops, more strongly the more
negative alpha is; alpha -> 0 is the identity. The official code (soft_decay.py, transform_layer.py, and
pooling_utils.soft_expand for the STS demo on pooled sentence embeddings) does exactly this; two choices are ours:

- Scale. f is not scale-free: alpha means something only against the size of the singular values. The paper applies
  it to token states of a LayerNorm'd Transformer, whose entries have unit RMS. We divide the matrix by the RMS of
  its entries first (and multiply back after), so any model's features are transformed as a LayerNorm'd matrix of
  the same shape would be: softdecay(c M) = c softdecay(M).
- Negative values. f(s) < 0 for s < |alpha| (in those units); the official code keeps the negative value, which
  flips that direction. A singular value cannot be negative: we clamp f at 0, dropping those (tiny) directions.

Rows are tokens (a sentence's token matrix, L x D) or examples (pooled features, N x D); a stack (..., L, D) is
transformed matrix by matrix. Pure numpy; the differentiable twin for fine-tuning is workers/tuning/softdecay.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.contract.names import SOFTDECAY_ALPHA_RANGE

ALPHA_LOW, ALPHA_HIGH = SOFTDECAY_ALPHA_RANGE  # at -1 and below, ln(1 + |alpha| s - alpha^2) has no floor


def check_alpha(alpha: float) -> float:
    """alpha as a float in (-1, 0], else ValueError."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha):
        raise ValueError(f"alpha: expected a finite number, got {alpha!r}")
    if not ALPHA_LOW < alpha <= ALPHA_HIGH:
        raise ValueError(f"alpha: must be in ({ALPHA_LOW:g}, {ALPHA_HIGH:g}], got {alpha}")
    return float(alpha)


def decayed_singular_values(singular: np.ndarray, alpha: float) -> np.ndarray:
    """s' = max(f(s), 0) * s_1 / f(s_1) along the last axis (singular values, largest first, in the units of a
    unit-RMS matrix); the identity for alpha = 0."""
    alpha = check_alpha(alpha)
    s = np.asarray(singular, dtype=np.float64)
    if alpha == 0.0 or s.shape[-1] == 0:
        return s.copy()
    decayed = np.maximum(np.log1p(-alpha * (s + alpha)) / -alpha, 0.0)
    top_before, top_after = s[..., :1], decayed[..., :1]
    # a matrix of unit RMS has s_1 >= 1 > |alpha|, so f(s_1) > 0; an all-zero matrix stays 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(top_after > 0, decayed * top_before / np.where(top_after > 0, top_after, 1.0), 0.0)


def softdecay(matrix: np.ndarray, alpha: float) -> np.ndarray:
    """The matrix (or stack of matrices, last two axes) rebuilt from its own singular vectors and its SoftDecay'd
    singular values (see the module docstring); same shape and floating dtype (computed in float64)."""
    alpha = check_alpha(alpha)
    values = np.asarray(matrix)
    if values.ndim < 2:
        raise ValueError(f"matrix: expected at least 2 dimensions (rows x features), got shape {values.shape}")
    dtype = values.dtype if np.issubdtype(values.dtype, np.floating) else np.dtype(np.float64)
    m = values.astype(np.float64)
    if alpha == 0.0 or m.size == 0:
        return m.astype(dtype)
    scale = np.sqrt(np.mean(m * m, axis=(-2, -1), keepdims=True))
    safe = np.where(scale > 0, scale, 1.0)
    u, s, vt = np.linalg.svd(m / safe, full_matrices=False)
    rebuilt = (u * decayed_singular_values(s, alpha)[..., None, :]) @ vt
    return (rebuilt * safe).astype(dtype)


def spectrum_skew(matrix: np.ndarray) -> float:
    """s_1 / sum(s): the share of the largest singular value (1: rank one, 1/min(N, D): a flat spectrum)."""
    s = np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)
    return float(s[0] / s.sum()) if s.sum() > 0 else 0.0


# ---- the rank job's feature transform ---------------------------------------------------------------------------


def apply_feature_transform(features: np.ndarray, transform: dict[str, Any] | None) -> np.ndarray:
    """A rank job's features after its `feature_transform` ({"name": "softdecay", "alpha": a}; None or name "none":
    as they are, the same array). Applied to the N x D matrix of the rows being scored, after layer selection."""
    if transform is None or transform.get("name", "none") == "none":
        return features
    if transform["name"] != "softdecay":
        raise ValueError(f"feature_transform: unknown transform {transform['name']!r}")
    return softdecay(features, transform["alpha"])

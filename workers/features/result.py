"""What a feature extraction returns (`FeatureResult`), and the rows it fills batch by batch (`FeatureRows`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

POOLING = "mean"  # what rank jobs pool with (the other: "head", see service.contract.POOLINGS)


class FeatureExtractionCancelled(Exception):
    """should_cancel() returned True between two batches."""


@dataclass
class FeatureResult:
    features: np.ndarray  # (N, D) float32, in the caller's text order
    source_probs: np.ndarray | None  # (N, Z) softmax of the model's own classification head, if it has one
    forward_seconds: float  # forward passes and pooling only (synchronised on GPU)
    total_seconds: float  # loading + tokenising + forward + copying back
    tokens: int  # real tokens (special tokens included, padding excluded)
    padded_tokens: int  # tokens fed to the model, padding included
    num_parameters: int  # all parameters of the loaded model
    flops_estimate: float = 0.0  # useful forward FLOPs: 2·(matmul weights)·tokens + attention's 4·d·Σ len² per layer
    device: str = "cpu"
    load_seconds: float = 0.0  # model and tokenizer loading, part of total_seconds
    # (N, L + 1, D) float16: every hidden state pooled alike (0: the embedding output, L: the last layer), from the
    # same forward passes, so a job asking for other layers needs none; None for image models
    layer_features: np.ndarray | None = None

    def select(self, layers: str | list[int] = "last") -> np.ndarray:
        """The features a job reads (N, D): "last" the last hidden state as pooled; "all" the mean of every
        layer's pooled output (the embedding output left out); a list of indices into the hidden states (0: the
        embedding output, 1..L the layers, negative from the end) their mean. ValueError when this result has no
        per-layer states (image models) or an index is out of this model's range."""
        if layers == "last":
            return self.features
        if self.layer_features is None:
            raise ValueError(f"layers {layers!r}: this model's features have no per-layer states (image models "
                             "are read at their last layer)")
        count = self.layer_features.shape[1]
        if layers == "all":
            chosen = list(range(1, count)) or [0]
        else:
            bad = [i for i in layers if not -count <= i < count]
            if bad:
                raise ValueError(f"layers: index {bad[0]} is out of range for a model with {count - 1} layers "
                                 f"(0 is the embedding output, -1 the last layer)")
            chosen = list(layers)
        return self.layer_features[:, chosen].astype(np.float32).mean(axis=1)

    @property
    def padding_waste(self) -> float:
        """Fraction of the tokens fed to the model that were padding."""
        return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    @property
    def flops_per_second(self) -> float:
        """Achieved useful FLOP/s of the forward passes (padding counts as wasted time, not as work)."""
        return self.flops_estimate / self.forward_seconds if self.forward_seconds > 0 else 0.0


class FeatureRows:
    """Pooled features (and source-head probabilities) written batch by batch into arrays in the caller's order."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.features: np.ndarray | None = None
        self.probs: np.ndarray | None = None
        self.layers: np.ndarray | None = None

    def put(self, rows: Any, pooled: Any, probs: Any | None, layers: Any | None = None) -> None:
        """Store one batch: `rows` are the positions of its items, pooled (and probs, and the pooled state of every
        layer (B, L + 1, D)) torch tensors on any device."""
        if layers is not None:
            layers_np = layers.cpu().numpy()
            if self.layers is None:
                self.layers = np.empty((self.count, *layers_np.shape[1:]), dtype=np.float16)
            self.layers[rows] = layers_np
        pooled_np = pooled.cpu().numpy()
        if self.features is None:
            self.features = np.empty((self.count, pooled_np.shape[1]), dtype=np.float32)
        self.features[rows] = pooled_np
        if probs is not None:
            probs_np = probs.cpu().numpy()
            if self.probs is None:
                self.probs = np.empty((self.count, probs_np.shape[1]), dtype=np.float32)
            self.probs[rows] = probs_np

"""Forward FLOPs: counted from the weights for texts (no padding counted), by torch's FlopCounterMode for images."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def matmul_parameters(model: Any) -> int:
    """Weights that multiply every token (Linear layers, Conv1D in GPT-2 style models); embeddings are lookups."""
    import torch

    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            total += module.weight.numel()
    return total


def text_forward_flops(base: Any, config: Any, lengths: np.ndarray) -> float:
    """Useful FLOPs of reading texts of `lengths` tokens through `base`: 2 FLOPs per weight per real token, plus
    attention's scores and mixing (4·d_attn·n² per layer for a text of n tokens). Padding is excluded: it is work
    done, not work needed."""
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    head_dim = int(getattr(config, "head_dim", 0) or (hidden // heads if heads else 0))
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    squares = float((lengths.astype(np.float64) ** 2).sum())
    return 2.0 * matmul_parameters(base) * float(lengths.sum()) + 4.0 * layers * heads * head_dim * squares


def counted_flops(forward: Callable[[], Any]) -> float:
    """The FLOPs torch's FlopCounterMode counts in one call of `forward`, run under inference_mode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        forward()
    return float(counter.get_total_flops())

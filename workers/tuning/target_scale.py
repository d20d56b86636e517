"""Regression targets standardised for training, and the scale folded back into the checkpoint's output layer.

A new regression head starts out predicting about 0. With targets far from 0 (prices, years, ratings 1-5) and a
fine-tuning learning rate (2e-5, a few hundred steps), AdamW moves the head's bias by about lr per step: it never
reaches the mean, and the tuned model is worse than predicting the mean (R^2 < 0 by orders of magnitude). So the
loop trains on z = (y - mean) / std of the training targets, reads its predictions back as mean + std * output,
and before saving folds that map into the last linear layer of the head (W <- std W, b <- std b + mean), so the
checkpoint predicts y itself with plain `AutoModelForSequenceClassification`.

Heads without a bias (Hugging Face's decoder-only classifiers: Llama, Gemma, Qwen, GPT-2 `score`) cannot hold
the mean: there std is folded into W and the mean is written to config.json as `hubtune_target_offset`, to be
added to the outputs (the model card says so). A fold whose check fails (a head this code does not know) is undone
and both numbers go to the config instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class TargetScale:
    mean: np.ndarray  # (T,) float32
    std: np.ndarray  # (T,) float32, 1 where a target is constant

    @classmethod
    def fit(cls, targets: np.ndarray) -> TargetScale:
        y = np.asarray(targets, dtype=np.float64).reshape(len(targets), -1)
        std = y.std(axis=0)
        return cls(mean=y.mean(axis=0).astype(np.float32), std=np.where(std > 0, std, 1.0).astype(np.float32))

    def standardise(self, targets: np.ndarray) -> np.ndarray:
        y = np.asarray(targets, dtype=np.float32).reshape(len(targets), -1)
        return ((y - self.mean) / self.std).astype(np.float32)

    def restore(self, outputs: Tensor) -> Tensor:
        """Model outputs (B, T) on the standardised scale -> predictions of y."""
        std = torch.as_tensor(self.std, device=outputs.device, dtype=outputs.dtype)
        mean = torch.as_tensor(self.mean, device=outputs.device, dtype=outputs.dtype)
        return outputs * std + mean


def fold_into_head(model: nn.Module, scale: TargetScale, probe: dict[str, Tensor]) -> dict[str, Any]:
    """Fold `scale` into the output layer so that the model predicts y; check it on one batch of model inputs.

    Returns what was done, for the model card: {"folded": "weight and bias" | "weight"} and, where the mean
    (or everything) could not be folded, the offset (and scale) written to model.config."""
    from workers.features import classifier_layer

    num_outputs = int(scale.mean.shape[0])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        want = scale.restore(model(**probe).logits.float())
        layer = classifier_layer(model, num_outputs)
        done: dict[str, Any] = {"target_mean": scale.mean.tolist(), "target_std": scale.std.tolist()}
        if layer is not None:
            std = torch.as_tensor(scale.std, device=layer.weight.device, dtype=layer.weight.dtype)
            mean = torch.as_tensor(scale.mean, device=layer.weight.device, dtype=layer.weight.dtype)
            layer.weight.mul_(std[:, None])
            if layer.bias is not None:
                layer.bias.mul_(std).add_(mean)
            got = model(**probe).logits.float()
            offset = torch.zeros_like(want) if layer.bias is not None else mean.float()
            tolerance = 1e-4 * float(want.abs().max().clamp_min(1.0))
            if torch.allclose(got + offset, want, rtol=1e-4, atol=tolerance):
                done["folded"] = "weight and bias" if layer.bias is not None else "weight"
                if layer.bias is None:
                    model.config.hubtune_target_offset = scale.mean.tolist()
                    done["offset_in_config"] = "hubtune_target_offset"
                model.train(was_training)
                return done
            if layer.bias is not None:  # undo: the layer found is not what produces the outputs
                layer.bias.sub_(mean).div_(std)
            layer.weight.div_(std[:, None])
    model.config.hubtune_target_offset = scale.mean.tolist()
    model.config.hubtune_target_scale = scale.std.tolist()
    done["folded"] = "nothing"
    done["offset_in_config"] = "hubtune_target_offset, hubtune_target_scale (y = offset + scale * output)"
    model.train(was_training)
    return done

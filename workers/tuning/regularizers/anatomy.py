"""Where things are in a model: backbone and head, the Transformer layers, a parameter's depth, the input
embeddings, dropout; and the hook that maps a layer's input."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------- model anatomy


def backbone_and_head(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Split parameters into the pretrained backbone and the new head.

    Hugging Face models name their backbone `model.base_model_prefix` (bert, model, roberta...): everything under
    it came from the checkpoint, the rest (classifier, score) is the task head. Other modules count as backbone.
    """
    prefix = getattr(model, "base_model_prefix", None)
    named = list(model.named_parameters())
    if not prefix or not isinstance(getattr(model, prefix, None), nn.Module):
        return named, []
    backbone = [(n, p) for n, p in named if n == prefix or n.startswith(prefix + ".")]
    head = [(n, p) for n, p in named if not (n == prefix or n.startswith(prefix + "."))]
    return backbone, head


def backbone_module(model: nn.Module) -> nn.Module:
    prefix = getattr(model, "base_model_prefix", None)
    sub = getattr(model, prefix, None) if prefix else None
    return sub if isinstance(sub, nn.Module) else model


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of Transformer blocks: the longest ModuleList of same-class modules in the backbone."""
    best: nn.ModuleList | None = None
    for module in backbone_module(model).modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ValueError("no stack of Transformer layers found in this model")
    return best


_LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


def layer_depth(name: str, num_layers: int) -> int:
    """0 for embeddings, i+1 for Transformer layer i, num_layers+1 for what follows (pooler, final norm)."""
    match = _LAYER_INDEX.search(name)
    if match:
        return int(match.group(1)) + 1
    if "embed" in name:
        return 0
    return num_layers + 1


def first_tensor(value: Any) -> Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def layer_input_hook(fn: Callable[[Tensor], Tensor]) -> Callable:
    """A forward pre-hook (with kwargs) that maps a layer's hidden-state input through `fn`."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        if "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = fn(kwargs["hidden_states"])
            return args, kwargs
        return None

    return hook



def input_embedding(model: nn.Module) -> nn.Module:
    """The module whose output are the token embeddings the model reads: for an encoder-decoder (T5, BART) the
    encoder's own embed_tokens, a module apart from the shared one get_input_embeddings() returns (a hook there
    never fires); otherwise get_input_embeddings()."""
    if getattr(model.config, "is_encoder_decoder", False):
        base = model.base_model
        encoder = base.get_encoder() if hasattr(base, "get_encoder") else None
        tokens = getattr(encoder, "embed_tokens", None)
        if tokens is not None:
            return tokens
    return model.get_input_embeddings()



def set_dropout(module: nn.Module, p: float | None, saved: dict[nn.Dropout, float]) -> None:
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            if p is None:  # restore
                sub.p = saved.get(sub, sub.p)
            else:
                saved.setdefault(sub, sub.p)
                sub.p = p




def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers LoRA adapted (peft's LoraLayer: lora_A, lora_B, the frozen base layer), found without importing
    peft; empty for a model tuned in full."""
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "get_delta_weight") and hasattr(m, "get_base_layer")]


def delta_weight(layer: nn.Module) -> Tensor:
    """A LoRA layer's update W - W0 = scaling * B A (differentiable; in the base weight's layout)."""
    return layer.get_delta_weight(layer.active_adapters[0])


def scale_update(layer: nn.Module, factor: float) -> None:
    """Multiply the layer's update B A by `factor` (through B: a radial scaling of W - W0)."""
    for name in layer.active_adapters:
        layer.lora_B[name].weight.mul_(factor)

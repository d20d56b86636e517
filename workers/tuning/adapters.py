"""LoRA adapters through `peft` (Hu et al., ICLR 2022): attach them to a freshly loaded classifier, count what
trains, and write the checkpoint: the adapter with the trained head, the classifier's config, and on request a
merged copy.

`attach_lora` injects LoRA layers into the Hugging Face model in place (peft's `get_peft_model`): the training loop
and every piece keep working on that model, whose only trainable parameters are now the adapters' A and B and the
new head (peft's `modules_to_save`). The PeftModel wrapping it is kept for saving.

"auto" target modules: the attention's query and value projections, the matrices the LoRA paper adapts, found by
peft's table of architectures or, for one it does not list (MPNet, ViT, DistilBERT, CLIP...), by the first
(query, value) pair of names among the backbone's nn.Linear layers; "all-linear" adapts every linear layer of
the backbone.

Offline loading: `adapter_config.json` names as its base a folder beside the checkpoint, `<checkpoint>.base`,
holding the classifier's config (labels, problem type, padding) and links to the pretrained weight files; so
`AutoPeftModelForSequenceClassification.from_pretrained(checkpoint)` builds the classifier with the right head
size without arguments. Elsewhere, load the base model with `config=AutoConfig.from_pretrained(checkpoint)` and
`PeftModel.from_pretrained(base, checkpoint)`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from workers.tuning.regularizers.anatomy import backbone_and_head, backbone_module, lora_layers

# (query, value) names of attention projections by architecture family, tried in order when peft lists none
_QUERY_VALUE = (("query", "value"), ("q_proj", "v_proj"), ("q", "v"), ("q_lin", "v_lin"),
                ("query_proj", "value_proj"), ("query_key_value", "query_key_value"), ("c_attn", "c_attn"),
                ("qkv", "qkv"), ("Wqkv", "Wqkv"))
_WEIGHT_FILES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def _linear_names(model: nn.Module) -> set[str]:
    return {name.rpartition(".")[2] for name, m in backbone_module(model).named_modules() if isinstance(m, nn.Linear)}


def resolve_target_modules(model: nn.Module, asked: str | list[str]) -> list[str] | str:
    """The module names LoRA adapts: the list given, "all-linear", or for "auto" the query and value projections
    (ValueError when the model has none: a CNN needs its layers named)."""
    if asked != "auto":
        if isinstance(asked, list):
            # peft's rule: a name matches a module whose full name is it or ends with "." + it, so a dotted suffix
            # ("expand_1x1.convolution") picks some of the layers a last component ("convolution") names
            modules = [name for name, _ in model.named_modules()]
            missing = [n for n in asked if not any(m == n or m.endswith("." + n) for m in modules)]
            if missing:
                raise ValueError(f"peft.target_modules: the model has no module named {missing[0]!r}")
        return asked
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as KNOWN

    names = _linear_names(model)
    listed = KNOWN.get(getattr(model.config, "model_type", ""))
    if listed and set(listed) <= names:
        return list(listed)
    for query, value in _QUERY_VALUE:
        if query in names and value in names:
            return sorted({query, value})
    raise ValueError("peft.target_modules: \"auto\" found no attention query/value projections in this model; "
                     "give the module names, or \"all-linear\"")


def head_modules(model: nn.Module) -> list[str]:
    """The top-level modules of the new head (classifier, score, classification_head, pre_classifier...): trained
    in full beside the adapters and saved with them."""
    _, head = backbone_and_head(model)
    return sorted({name.split(".")[0] for name, _ in head})


def attach_lora(model: nn.Module, spec: dict[str, Any], modality: str) -> tuple[Any, dict[str, Any]]:
    """Inject LoRA into `model` in place; (the PeftModel wrapping it, what was adapted)."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = resolve_target_modules(model, spec["target_modules"])
    heads = head_modules(model)
    config = LoraConfig(task_type=TaskType.SEQ_CLS if modality == "text" else None, r=spec["r"],
                        lora_alpha=spec["alpha"], lora_dropout=spec["dropout"], target_modules=targets,
                        modules_to_save=list(heads), bias="none")
    peft_model = get_peft_model(model, config)
    adapted = sorted(name for name, _ in lora_layers(model))
    if not adapted:
        raise ValueError("peft.target_modules: no layer of this model was adapted")
    return peft_model, {"method": "lora", "r": spec["r"], "alpha": spec["alpha"], "dropout": spec["dropout"],
                        "target_modules": targets, "adapted_layers": len(adapted), "trained_head": heads,
                        "merge": spec["merge"]}


def base_weight(layer: nn.Module) -> Tensor:
    return layer.get_base_layer().weight


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameters (with LoRA, the frozen base weights count in the total, once)."""
    seen: set[int] = set()
    trainable = total = 0
    for _, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"trainable_parameters": trainable, "total_parameters": total}


def write_base_view(model: nn.Module, model_dir: Path, folder: Path) -> Path:
    """`folder` holding the classifier's config and links to the pretrained weight files of `model_dir`: the base
    that adapter_config.json names (see the module docstring). Rewritten whole each time."""
    import shutil

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    config = model.config
    config.architectures = [type(model).__name__]
    config.to_json_file(folder / "config.json")
    for path in sorted(Path(model_dir).iterdir()):
        if path.is_file() and path.name.endswith(_WEIGHT_FILES):
            os.symlink(path.absolute(), folder / path.name)
    return folder


def save_adapter(peft_model: Any, model: nn.Module, preprocessor: Any, folder: Path, base: Path, merge: bool) -> None:
    """The adapter (with the trained head), the classifier's config and, with merge, `merged/`: the weights with
    B A added in, a plain Hugging Face folder. Merging changes `model` in place, so it comes last."""
    peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path = str(base)
    peft_model.save_pretrained(folder, safe_serialization=True)
    model.config.to_json_file(Path(folder) / "config.json")
    if merge:
        with torch.no_grad():
            merged = peft_model.merge_and_unload()
        merged.save_pretrained(Path(folder) / "merged", safe_serialization=True)
        preprocessor.save_pretrained(Path(folder) / "merged")

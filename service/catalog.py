"""Which local folders may enter the catalog, and what the catalog records about one, read from its config.json
alone. Torch-free.

A folder that cannot be catalogued raises `ModelFolderProblem`; the API renders it as a problem+json naming the
field (`path`): 403, always the same, for a folder the caller may not register, 422 for one that is no model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from service.contract import IMAGE_PROCESSOR_FILE, TOKENIZER_ENTRY_FILES
from service.settings import Settings

# Classification heads whose softmax LEEP and NCE read (with an id2label in the config).
SOURCE_HEADS = ("ForSequenceClassification", "ForImageClassification")
# Contrastive image-text dual encoders: catalogued as image models, ranked and tuned through their vision tower
# (the common use of CLIP-like checkpoints as image backbones); their text tower is not offered for text datasets.
DUAL_ENCODERS = frozenset({"clip", "siglip", "siglip2", "align", "altclip", "chinese_clip", "metaclip_2"})
# Keys only a model that reads pixels has at the top of its config.
VISION_KEYS = ("image_size", "num_channels", "patch_size")
# Where the width of the ranked tower is found, first match wins.
_WIDTH_KEYS = ("hidden_size", "d_model", "n_embd", "dim", "hidden_dim")


class ModelFolderProblem(Exception):
    """A folder the catalog cannot record: an HTTP status (422), a title, and the request field at fault."""

    def __init__(self, status: int, title: str, detail: str = "", field: str | None = "path") -> None:
        super().__init__(detail or title)
        self.status, self.title, self.detail, self.field = status, title, detail, field


def folder_refused() -> ModelFolderProblem:
    """The one answer to every folder the caller may not register. It says nothing of the folder itself (whether
    it exists, is a folder, holds a model), so it cannot be used to explore the server's disk."""
    return ModelFolderProblem(403, "model folder not allowed", "local model folders are registered by an admin, "
                              "below HUBTUNE_MODEL_ROOTS and outside HubTune's own state (HUBTUNE_HOME); register a "
                              "hub repository, or a job's checkpoint with {\"source\": \"checkpoint\", \"job_id\", "
                              "\"name\"}, instead")


def registrable_folder(path: str | None, admin: bool, settings: Settings, keyless: bool) -> Path:
    """The resolved folder `path` names, if this caller may register it: an admin, and the folder (symlinks
    followed) below one of HUBTUNE_MODEL_ROOTS and outside HUBTUNE_HOME. With no roots set, the keyless local user
    may register any folder it can read, as before keys had roles; with keys required no one may. Every refusal is
    folder_refused(); whether the folder exists is only checked for a folder that may be registered."""
    if not admin:
        raise folder_refused()
    roots = settings.model_root_dirs
    if not roots:
        if keyless:
            return local_folder(path)
        raise folder_refused()
    named = Path(path or "").expanduser()
    if not named.is_absolute():
        raise folder_refused()
    real = Path(os.path.realpath(named))
    if real.is_relative_to(settings.home_dir) or not any(real.is_relative_to(root) for root in roots):
        raise folder_refused()
    return local_folder(str(real))


def local_folder(path: str | None) -> Path:
    """The resolved folder a local model's `path` names; it must be absolute and a folder the server can read."""
    folder = Path(path or "").expanduser()
    if not folder.is_absolute() or not folder.is_dir():
        raise ModelFolderProblem(422, "model folder not found", f"{path} is not an absolute path to a folder "
                                 "the server can read")
    return folder.resolve()


def read_model_config(folder: Path) -> dict[str, Any]:
    """What the catalog records about a local HF folder, read from config.json alone (no transformers here)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelFolderProblem(422, "not a model folder", f"{folder} has no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFolderProblem(422, "unreadable config.json", str(exc)) from exc
    modality = model_modality(config)
    # the width of the tower that is ranked: a dual encoder's vision tower, a vision-language model's language model
    tower = (config.get("vision_config") if modality == "image" else config.get("text_config")) or {}
    hidden = next((c.get(k) for c in (config, tower) for k in _WIDTH_KEYS if isinstance(c.get(k), int)), None)
    if hidden is None and isinstance(config.get("hidden_sizes"), list) and config["hidden_sizes"]:
        hidden = config["hidden_sizes"][-1]  # CNNs (ResNet, ConvNeXt): the last stage's channels
    architectures = config.get("architectures") or []
    has_head = any(a.endswith(SOURCE_HEADS) for a in architectures) and bool(config.get("id2label"))
    _check_preprocessing_files(folder, modality)
    return {"model_type": config.get("model_type"), "architecture": architectures[0] if architectures else None,
            "hidden_size": hidden, "has_source_head": has_head, "modality": modality}


def _check_preprocessing_files(folder: Path, modality: str) -> None:
    """A text model needs its tokenizer beside the weights, an image model its image processor."""
    if modality == "text" and not any((folder / name).is_file() for name in TOKENIZER_ENTRY_FILES):
        raise ModelFolderProblem(422, "no tokenizer", f"{folder} holds a text model but no tokenizer files (one of "
                                 f"{', '.join(TOKENIZER_ENTRY_FILES)}); save it beside the weights: "
                                 "tokenizer.save_pretrained(folder)")
    if modality == "image" and not (folder / IMAGE_PROCESSOR_FILE).is_file():
        raise ModelFolderProblem(422, "no image processor", f"{folder} holds an image model but no "
                                 f"{IMAGE_PROCESSOR_FILE} (how images are resized and normalised for it); save it "
                                 "beside the weights: image_processor.save_pretrained(folder)")


def model_modality(config: dict[str, Any]) -> str:
    """"text" for a model that reads token ids (a vocabulary), "image" for one that reads pixels. A job's candidates
    are the models of its dataset's modality.

    Vision keys at the top level win over a vocabulary: BEiT and Data2VecVision carry a vocab_size for masked image
    modelling. A vision-language model (text_config and vision_config: LLaVA, Gemma 3, Qwen2-VL) is a text model
    (its language model reads the text); a contrastive dual encoder (DUAL_ENCODERS) is an image model."""
    if config.get("model_type") in DUAL_ENCODERS or any(key in config for key in VISION_KEYS):
        return "image"
    text_config = config.get("text_config") or {}
    if "vocab_size" in config or "vocab_size" in text_config:
        return "text"
    if "vision_config" in config:
        return "image"
    return "text"

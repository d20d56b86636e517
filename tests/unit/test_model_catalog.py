"""What the API records about a local model folder at registration (service.api.read_model_config; no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.api import Problem, model_modality, read_model_config


def folder_with(tmp_path: Path, config: dict, *files: str) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    for name in files:
        (folder / name).write_text("{}")
    return folder


@pytest.mark.parametrize("config, modality", [
    ({"model_type": "bert", "vocab_size": 30522, "hidden_size": 384}, "text"),
    ({"model_type": "vit", "image_size": 224, "patch_size": 16, "num_channels": 3, "hidden_size": 768}, "image"),
    ({"model_type": "mobilenet_v2", "num_channels": 3, "image_size": 224}, "image"),
    ({"model_type": "clip", "text_config": {"vocab_size": 49408}, "vision_config": {"image_size": 224}}, "text"),
    ({"model_type": "siglip_vision_model", "vision_config": {"image_size": 224}}, "image"),
    ({"model_type": "somethingnew", "hidden_size": 8}, "text"),  # unknown: let the worker try, and report failure
])
def test_modality_from_config(config: dict, modality: str) -> None:
    assert model_modality(config) == modality


def test_registration_reads_the_config_and_needs_a_tokenizer_for_text(tmp_path: Path) -> None:
    bert = {"model_type": "bert", "vocab_size": 100, "hidden_size": 32, "architectures": ["BertModel"]}
    described = read_model_config(folder_with(tmp_path / "a", bert, "tokenizer.json"))
    assert described == {"model_type": "bert", "architecture": "BertModel", "hidden_size": 32,
                         "has_source_head": False, "modality": "text"}
    with pytest.raises(Problem) as info:
        read_model_config(folder_with(tmp_path / "b", bert))  # weights saved, tokenizer forgotten
    assert (info.value.status, info.value.title, info.value.field) == (422, "no tokenizer", "path")
    vit = {"model_type": "vit", "image_size": 32, "num_channels": 3, "hidden_size": 32,
           "architectures": ["ViTForImageClassification"], "id2label": {"0": "cat", "1": "dog"}}
    described = read_model_config(folder_with(tmp_path / "c", vit, "preprocessor_config.json"))  # no tokenizer
    assert described["modality"] == "image" and described["has_source_head"]
    with pytest.raises(Problem) as info:
        read_model_config(folder_with(tmp_path / "d", vit))  # an image model needs its image processor
    assert (info.value.status, info.value.title, info.value.field) == (422, "no image processor", "path")

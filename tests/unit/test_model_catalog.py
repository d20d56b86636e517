"""What the API records about a local model folder at registration (service.catalog.read_model_config; no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.catalog import ModelFolderProblem as Problem
from service.catalog import model_modality, read_model_config


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
    # a contrastive dual encoder is ranked and tuned through its vision tower
    ({"model_type": "clip", "text_config": {"vocab_size": 49408}, "vision_config": {"image_size": 224}}, "image"),
    ({"model_type": "siglip", "text_config": {"vocab_size": 32000}, "vision_config": {"image_size": 224}}, "image"),
    # BEiT's vocab_size is for masked image modelling: it reads pixels
    ({"model_type": "beit", "vocab_size": 8192, "image_size": 224, "patch_size": 16, "num_channels": 3}, "image"),
    # a vision-language model reads text through its language model
    ({"model_type": "gemma3", "text_config": {"vocab_size": 262208}, "vision_config": {"image_size": 896}}, "text"),
    ({"model_type": "t5", "vocab_size": 32128, "d_model": 512, "is_encoder_decoder": True}, "text"),
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


def test_a_dual_encoder_is_catalogued_with_its_vision_towers_width(tmp_path: Path) -> None:
    clip = {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": 512,
            "text_config": {"vocab_size": 49408, "hidden_size": 512}, "vision_config": {"hidden_size": 768}}
    described = read_model_config(folder_with(tmp_path, clip, "preprocessor_config.json", "tokenizer.json"))
    assert (described["modality"], described["hidden_size"]) == ("image", 768)

"""LoRA through peft: the base weights stay as they were, only the adapters and the head train, the checkpoint
reloads offline (adapter and merged) and predicts the logits the tuned model predicted, the parameter count is
reported, and the weight-space regularizers mean what docs/tuning.md says with adapters (mixout is refused)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError
from safetensors.torch import load_file

from service.app import create_app
from service.contract import TuneConfig, TuneSpec, resolve_peft
from service.settings import Settings
from tests.tiny_models import make_tiny_bert, make_tiny_llama, make_tiny_vit
from tests.unit.test_image_tuning import colours
from workers.tuning import loop
from workers.tuning.adapters import attach_lora, resolve_target_modules
from workers.tuning.btuning import BTuningTeacher
from workers.tuning.data import ExampleDataset
from workers.tuning.regularizers import L2SP, SelfLabeling
from workers.tuning.regularizers.anatomy import delta_weight, lora_layers

torch.set_num_threads(1)

SPORT = "game match team win player season goal".split()
MONEY = "market shares bank profit company economy price".split()


def toy(n: int, seed: int) -> ExampleDataset:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(SPORT if i % 2 == 0 else MONEY, 6)) for i in range(n)]
    return ExampleDataset(texts, np.array([i % 2 for i in range(n)]))


TRAIN, VAL = toy(48, 1), toy(24, 2)
NAMES = ["sport", "business"]


def config(**overrides) -> TuneConfig:
    base = dict(epochs=4, lr=3e-2, batch_size=8, max_length=16, warmup_ratio=0.0, save_every_steps=0, seed=0,
                device="cpu", peft={"r": 4})
    base.update(overrides)
    return TuneConfig(**base)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


def capture_saved(monkeypatch) -> dict:
    """The tuned model as _save_run receives it: its weights, and its logits on VAL's first rows."""
    seen: dict = {}
    original = loop._save_run

    def spy(result, loaded, *args, **kwargs):
        loaded.model.eval()
        seen["state"] = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
        seen["trainable"] = sorted(n for n, p in loaded.model.named_parameters() if p.requires_grad)
        if not isinstance(loaded.train, loop.EncodedImages):
            enc = loaded.preprocessor(VAL.examples[:6], padding=True, return_tensors="pt")
            with torch.no_grad():
                seen["logits"] = loaded.model(**enc).logits.clone()
        return original(result, loaded, *args, **kwargs)

    monkeypatch.setattr(loop, "_save_run", spy)
    return seen


def test_only_the_adapters_and_head_train_the_base_is_untouched_and_the_checkpoint_reloads(
        bert_dir, tmp_path, monkeypatch):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    seen = capture_saved(monkeypatch)
    result = loop.train(config(peft={"r": 4, "merge": True}), bert_dir, TRAIN, VAL, "classification", NAMES,
                        tmp_path / "ckpt", tmp_path / "state")
    assert result.metrics["accuracy"] > 0.9

    # only A, B and the head's trained copy had gradients
    assert seen["trainable"] and all(("lora_A" in n or "lora_B" in n or "modules_to_save" in n)
                                     for n in seen["trainable"])
    # every pretrained weight is bit-identical to the folder's
    pretrained = AutoModel.from_pretrained(bert_dir).state_dict()
    state = seen["state"]
    compared = 0
    for key, value in pretrained.items():
        tuned = state.get(f"bert.{key}") if f"bert.{key}" in state else state[f"bert.{key}".replace(
            ".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")]
        assert torch.equal(tuned, value), key
        compared += 1
    assert compared == len(pretrained)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in state.items())  # B started at 0 and moved

    # trainable parameters, counted by hand: A (r x 32) and B (32 x r) on query and value of 2 layers, the head
    assert result.metrics["trainable_parameters"] == 2 * 2 * (4 * 32 + 32 * 4) + (32 * 2 + 2)
    assert result.details["peft"]["target_modules"] == ["query", "value"]

    # the adapter holds only adapters and the head; it and the merged folder load offline and predict as tuned
    folder = tmp_path / "ckpt"
    keys = load_file(folder / "adapter_model.safetensors").keys()
    assert keys and all("lora_" in k or "classifier" in k for k in keys)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    enc = tokenizer(VAL.examples[:6], padding=True, return_tensors="pt")
    adapter = AutoPeftModelForSequenceClassification.from_pretrained(folder).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(folder / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(adapter(**enc).logits, seen["logits"], atol=1e-5)
        assert torch.allclose(merged(**enc).logits, seen["logits"], atol=1e-5)
    assert merged.config.id2label == {0: "sport", 1: "business"}
    assert (folder / "merged" / "model.safetensors").stat().st_size > 4 * (folder / "adapter_model.safetensors"
                                                                           ).stat().st_size
    assert "AutoPeftModelForSequenceClassification" in (folder / "README.md").read_text()


def test_full_fine_tuning_reports_every_parameter_as_trainable(bert_dir, tmp_path):
    result = loop.train(config(peft=None, epochs=1, lr=3e-3), bert_dir, TRAIN, VAL, "classification", NAMES,
                        None, None)
    assert result.metrics["trainable_parameters"] == result.metrics["total_parameters"] > 30_000


def test_auto_targets_are_the_query_and_value_projections_per_architecture():
    from transformers import (
        LlamaConfig,
        LlamaForSequenceClassification,
        MPNetConfig,
        MPNetForSequenceClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    small = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    assert resolve_target_modules(MPNetForSequenceClassification(MPNetConfig(vocab_size=50, **small)),
                                  "auto") == ["q", "v"]
    assert resolve_target_modules(LlamaForSequenceClassification(LlamaConfig(vocab_size=50, **small)),
                                  "auto") == ["q_proj", "v_proj"]
    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, **small))
    names = {n.rpartition(".")[2] for n, _ in vit.named_modules()}
    vit_pair = ["q_proj", "v_proj"] if "q_proj" in names else ["query", "value"]  # transformers 5 renamed them
    assert resolve_target_modules(vit, "auto") == vit_pair
    with pytest.raises(ValueError, match="peft.target_modules: the model has no module named 'nope'"):
        resolve_target_modules(vit, ["nope"])


def test_a_tiny_llama_and_a_tiny_vit_tune_with_lora_and_reload(tmp_path, monkeypatch):
    from peft import AutoPeftModel, AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    seen = capture_saved(monkeypatch)
    llama = make_tiny_llama(tmp_path / "llama")
    result = loop.train(config(epochs=2), llama, TRAIN, VAL, "classification", NAMES, tmp_path / "ck",
                        tmp_path / "st")
    assert result.details["peft"]["target_modules"] == ["q_proj", "v_proj"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "ck").eval()
    enc = AutoTokenizer.from_pretrained(tmp_path / "ck")(VAL.examples[:6], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**enc).logits, seen["logits"], atol=1e-5)

    vit = make_tiny_vit(tmp_path / "vit")
    train_images, val_images = colours(24, 0), colours(12, 1)
    images = loop.train(config(epochs=2, lr=1e-2), vit, train_images, val_images, "classification",
                        ["red", "green", "blue"], tmp_path / "ivit", tmp_path / "svit")
    assert images.details["peft"]["adapted_layers"] == 4
    reloaded = AutoPeftModel.from_pretrained(tmp_path / "ivit").eval()
    assert reloaded.base_model.model.config.num_labels == 3


def lora_bert(bert_dir: Path, seed: int = 0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=2)
    attach_lora(model, resolve_peft({"r": 4}), "text")
    with torch.no_grad():
        for layer in (m for _, m in lora_layers(model)):
            layer.lora_B["default"].weight.normal_(0, 0.5)
    return model


def test_a_cnn_tunes_lora_on_the_convolutions_named_by_dotted_suffixes(tmp_path, monkeypatch):
    """MobileNetV2 has no attention and no linear layer in its backbone, and peft refuses its depthwise 3x3
    convolutions at a rank their groups do not divide: names ending in ".expand_1x1.convolution" etc. pick the
    pointwise ones (peft matches a module whose name ends with "." + the given name)."""
    from transformers import AutoModelForImageClassification

    from tests.tiny_models import make_tiny_mobilenet

    seen = capture_saved(monkeypatch)
    folder = make_tiny_mobilenet(tmp_path / "mnv2", seed=1)
    # symmetric padding, as torchvision's ImageNet weights (demo.prepare_hub); TF-style padding reads the
    # convolution's stride, which peft's LoRA wrapper does not expose
    settings = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**settings, "tf_padding": False}))
    pointwise = ["first_conv.convolution", "expand_1x1.convolution", "reduce_1x1.convolution",
                 "conv_1x1.convolution"]
    with pytest.raises(ValueError, match="no module named 'depthwise_1x1.convolution'"):
        resolve_target_modules(AutoModelForImageClassification.from_pretrained(folder),
                               [*pointwise, "depthwise_1x1.convolution"])
    result = loop.train(config(epochs=1, lr=1e-2, peft={"r": 4, "target_modules": pointwise}), folder,
                        colours(24, 0), colours(12, 1), "classification", ["red", "green", "blue"],
                        tmp_path / "ck", tmp_path / "st")
    base = AutoModelForImageClassification.from_pretrained(folder)
    dense_convs = {name: m for name, m in base.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1}
    assert result.details["peft"]["adapted_layers"] == len(dense_convs) > 10
    for name, conv in dense_convs.items():  # the pretrained kernels are untouched
        assert torch.equal(seen["state"][f"{name}.base_layer.weight"], conv.weight), name
    assert not any("conv_3x3" in n for n in seen["trainable"])  # the depthwise convolutions stay frozen


def test_l2sp_with_adapters_penalises_the_update_s_b_a(bert_dir):
    model = lora_bert(bert_dir)
    piece = L2SP(alpha=0.3, beta=0.2)
    piece.setup(model)
    by_hand = 0.0
    for _, layer in lora_layers(model):
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        by_hand += float(((layer.scaling["default"] * b @ a) ** 2).sum())
    head = sum(float((p.detach() ** 2).sum()) for n, p in model.named_parameters() if "modules_to_save" in n)
    assert float(piece.penalty()) == pytest.approx(0.15 * by_hand + 0.1 * head, rel=1e-5)


def test_self_labeling_with_adapters_bounds_each_update_by_scaling_b(bert_dir):
    model = lora_bert(bert_dir)
    piece = SelfLabeling(radius=0.01, growth=1.2, relative=True)
    piece.setup(model)
    before = {name: delta_weight(layer).detach().clone() for name, layer in lora_layers(model)}
    piece.after_step(model)
    for name, layer in lora_layers(model):
        depth = int(name.split(".layer.")[1].split(".")[0]) + 1
        bound = 0.01 * 1.2 ** depth * float(layer.get_base_layer().weight.norm())
        after = delta_weight(layer).detach()
        assert float(after.norm()) == pytest.approx(min(bound, float(before[name].norm())), rel=1e-5)
        cos = float((after * before[name]).sum() / (after.norm() * before[name].norm()))
        assert cos == pytest.approx(1.0, abs=1e-5)  # radial: the direction of the update kept


def test_btuning_and_sam_run_with_adapters(bert_dir, tmp_path):
    rng = np.random.default_rng(0)
    onehot = np.eye(2)[TRAIN.labels]
    feats = [onehot @ rng.normal(size=(2, 8)) + 0.1 * rng.normal(size=(len(TRAIN.labels), 8)) for _ in range(2)]
    ms = [np.linalg.lstsq(f, onehot, rcond=None)[0].T for f in feats]
    teacher = BTuningTeacher(feats, ms, scores=[-0.5, -0.6], student_weights=rng.normal(size=(2, 32)) * 0.1)
    both = loop.train(config(strategy="btuning", tradeoff=0.1, regularizer="sam", epochs=1), bert_dir, TRAIN, VAL,
                      "classification", NAMES, None, None, teacher=teacher)
    assert math.isfinite(both.metrics["val_loss"]) and both.details["sam"]["mean_loss_increase"] is not None


def test_mixout_with_peft_is_refused_with_a_422_naming_the_combination(tmp_path):
    with pytest.raises(ValidationError) as info:
        TuneSpec.model_validate({"regularizer": {"name": "mixout"}, "peft": {"method": "lora"}})
    assert info.value.errors()[0]["loc"] == ("peft",) and "mixout" in info.value.errors()[0]["msg"]
    with pytest.raises(ValueError, match="peft: lora cannot be combined with regularizer mixout"):
        TuneConfig(regularizer="mixout", peft={}).validate()
    TuneSpec.model_validate({"regularizer": {"name": "l2sp"}, "peft": {}})  # l2sp and self_labeling apply
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", auth="auto",
                        bind_host="127.0.0.1")
    with TestClient(create_app(settings, send=lambda *a: None, run_reconciler=False),
                    raise_server_exceptions=False, base_url="http://127.0.0.1") as client:
        for tune, where in (({"regularizer": {"name": "mixout"}, "peft": {}}, "tune.peft"),
                            ({"peft": {"r": 0}}, "tune.peft.r"), ({"peft": {"method": "ia3"}}, "tune.peft.method"),
                            ({"peft": {"dropout": 1}}, "tune.peft.dropout")):
            response = client.post("/v1/jobs", json={"dataset_id": "d", "tune": tune})
            assert response.status_code == 422, response.text
            assert response.json()["field"] == where
            if where == "tune.peft":
                assert "mixout" in response.text

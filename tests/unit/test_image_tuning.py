"""Fine-tuning image models with the same loop: it learns, it is reproducible, a source head of another size is
replaced, the checkpoint loads offline as an image classifier, B-Tuning distils through the features ranking read,
and text-only pieces are refused."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from service.contract.tuning import TuneConfig
from tests.tiny_models import make_tiny_clip, make_tiny_mobilenet, make_tiny_vit
from workers.tuning.btuning import BTuningTeacher
from workers.tuning.data import ExampleDataset
from workers.tuning.loop import train

torch.set_num_threads(1)
TINTS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
NAMES = list(TINTS)


def colours(n: int, seed: int) -> ExampleDataset:
    """Noisy 32×32 PNGs whose class is their tint: learnable in a few dozen steps."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files, labels = [], []
    for i in range(n):
        label = i % len(TINTS)
        pixels = np.clip(np.array(TINTS[NAMES[label]]) + rng.normal(0, 50, (32, 32, 3)), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="PNG")
        files.append(out.getvalue())
        labels.append(label)
    return ExampleDataset(files, np.array(labels))


TRAIN, VAL = colours(48, 1), colours(24, 2)


def config(**overrides) -> TuneConfig:
    base = dict(epochs=3, lr=3e-3, batch_size=8, warmup_ratio=0.0, save_every_steps=0, seed=0, device="cpu")
    base.update(overrides)
    return TuneConfig(**base)


@pytest.fixture(scope="module")
def vit_with_source_head(tmp_path_factory):
    return make_tiny_vit(tmp_path_factory.mktemp("vit") / "vit", num_labels=5, seed=3)


def test_vit_learns_reproducibly_and_its_checkpoint_loads(vit_with_source_head, tmp_path) -> None:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from workers.features import decode_images

    first = train(config(), vit_with_source_head, TRAIN, VAL, "classification", NAMES, tmp_path / "a" / "ckpt",
                  tmp_path / "a" / "state", card={"base_model": "tiny-vit"})
    assert first.metrics["accuracy"] >= 0.9, first.metrics  # chance is 1/3
    again = train(config(), vit_with_source_head, TRAIN, VAL, "classification", NAMES, tmp_path / "b" / "ckpt",
                  tmp_path / "b" / "state")
    assert again.metrics == first.metrics  # bit-identical on CPU

    folder = tmp_path / "a" / "ckpt"
    assert (folder / "preprocessor_config.json").is_file() and (folder / "model.safetensors").is_file()
    config_json = json.loads((folder / "config.json").read_text())
    assert config_json["id2label"] == {"0": "red", "1": "green", "2": "blue"}  # the 5-class source head replaced
    card = (folder / "README.md").read_text()
    assert "AutoModelForImageClassification" in card and "image-classification" in card
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        pixels = processor(images=decode_images(VAL.examples), return_tensors="pt")["pixel_values"]
        predicted = model(pixel_values=pixels).logits.argmax(-1).numpy()
    assert float((predicted == VAL.labels).mean()) == pytest.approx(first.metrics["accuracy"])


def test_cnn_with_l2sp_and_regression(tmp_path) -> None:
    """A CNN backbone without a head gets one; L2-SP acts on weights, so it applies; regression targets work."""
    folder = make_tiny_mobilenet(tmp_path / "mnv2", seed=1)
    result = train(config(regularizer="l2sp", epochs=2), folder, TRAIN, VAL, "classification", NAMES,
                   tmp_path / "c" / "ckpt", tmp_path / "c" / "state")
    assert np.isfinite(result.metrics["val_loss"])
    brightness = ExampleDataset(TRAIN.examples, TRAIN.labels.astype(np.float64) - 1.0)
    regression = train(config(epochs=1), folder, brightness, ExampleDataset(VAL.examples, VAL.labels - 1.0),
                       "regression", None, tmp_path / "r" / "ckpt", tmp_path / "r" / "state")
    assert np.isfinite(regression.metrics["rmse"])


def test_a_dual_encoder_tunes_its_vision_tower(tmp_path) -> None:
    """A CLIP folder tunes as CLIPForImageClassification (vision tower + a new head; the text tower is dropped) and
    its checkpoint is an image classifier."""
    from transformers import AutoModelForImageClassification

    folder = make_tiny_clip(tmp_path / "clip", seed=2)
    result = train(config(epochs=2), folder, TRAIN, VAL, "classification", NAMES, tmp_path / "k" / "ckpt",
                   tmp_path / "k" / "state")
    assert result.metrics["accuracy"] >= 0.9, result.metrics
    tuned = AutoModelForImageClassification.from_pretrained(tmp_path / "k" / "ckpt")
    assert type(tuned).__name__ == "CLIPForImageClassification" and tuned.config.num_labels == 3


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_a_dual_encoders_vision_tower_saved_alone_tunes(kind, tmp_path) -> None:
    """A CLIPVisionModel or SiglipVisionModel folder has no image classifier of its own (AutoModelForImageClassification
    knows no CLIPVisionConfig): it tunes as CLIPForImageClassification / SiglipForImageClassification, starting from
    the tower's own weights (the two write their keys with and without a vision_model. prefix)."""
    import transformers

    from workers.features import image_classifier

    tower = tmp_path / "tower"
    if kind == "clip":
        clip = make_tiny_clip(tmp_path / "clip", seed=2)
        transformers.CLIPVisionModel.from_pretrained(clip).save_pretrained(tower)
        transformers.AutoImageProcessor.from_pretrained(clip).save_pretrained(tower)
    else:
        torch.manual_seed(2)
        transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64)).save_pretrained(tower)
        transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tower)
    plain = transformers.AutoModel.from_pretrained(tower)
    plain = getattr(plain, "vision_model", plain)
    start = image_classifier(tower, {"num_labels": 3})  # what training starts from
    assert torch.equal(start.vision_model.embeddings.patch_embedding.weight,
                       plain.embeddings.patch_embedding.weight)
    result = train(config(epochs=2), tower, TRAIN, VAL, "classification", NAMES, tmp_path / "k" / "ckpt",
                   tmp_path / "k" / "state")
    assert result.metrics["accuracy"] >= 0.9, result.metrics
    tuned = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "k" / "ckpt")
    assert type(tuned).__name__ == f"{'CLIP' if kind == 'clip' else 'Siglip'}ForImageClassification"
    assert tuned.config.num_labels == 3


@pytest.mark.parametrize("kind, pooling", [("vit", "mean"), ("vit", "head"), ("cnn", "mean"), ("cnn", "head"),
                                           ("clip", "mean"), ("clip", "head")])
def test_training_features_are_the_features_ranking_read(kind, pooling, tmp_path) -> None:
    """B-Tuning applies m_t, fitted by LogME on ranking's features, to the student's features during training: they
    must be the same function of the image. hidden_states[-1] is not (a ViT's tokens before its final layer norm,
    MobileNetV2's last stage before its 1x1 convolution)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from workers.features import extract_image_features
    from workers.tuning.batches import EncodedImages as _Pixels
    from workers.tuning.regularizers import StepContext, pooled_features

    folder = {"vit": lambda: make_tiny_vit(tmp_path / "m", num_labels=5, seed=4),
              "cnn": lambda: make_tiny_mobilenet(tmp_path / "m", seed=4),
              "clip": lambda: make_tiny_clip(tmp_path / "m", seed=4)}[kind]()
    images = VAL.examples[:6]
    ranked = extract_image_features(folder, images, device="cpu", pooling=pooling).features
    model = AutoModelForImageClassification.from_pretrained(folder, num_labels=3, ignore_mismatched_sizes=True)
    batch = _Pixels(AutoImageProcessor.from_pretrained(folder), images, np.zeros(6, dtype=int), "RGB").batch(
        torch.arange(6), torch.device("cpu"), "classification")
    ctx = StepContext(model.eval(), batch, "classification", want_hidden=True)
    ctx.clean_forward()
    np.testing.assert_allclose(pooled_features(ctx, pooling).detach().numpy(), ranked, rtol=1e-4, atol=1e-5)


def test_btuning_tunes_an_image_model(tmp_path) -> None:
    """Teachers' LogME predictions on their image features, distilled into a ViT student through its own
    ranking-pooled features: it learns, and the distillation term is in the loss."""
    from workers.features import extract_image_features
    from workers.ranking import logme

    folders = [make_tiny_vit(tmp_path / "vit", seed=5), make_tiny_mobilenet(tmp_path / "cnn", seed=6)]
    feats = [extract_image_features(f, TRAIN.examples, device="cpu").features.astype(np.float64) for f in folders]
    fits = [logme(f, TRAIN.labels, num_classes=3) for f in feats]
    teacher = BTuningTeacher(feats, [r.weights for r in fits], [r.score for r in fits],
                             student_weights=fits[0].weights, names=["vit", "cnn"])
    result = train(config(strategy="btuning", tradeoff=0.5, regularizer="l2sp"), folders[0], TRAIN, VAL,
                   "classification", NAMES, tmp_path / "ckpt", tmp_path / "state", teacher=teacher)
    assert result.metrics["accuracy"] >= 0.9, result.metrics
    assert result.curve[-1]["train_total_loss"] > result.curve[-1]["train_loss"]
    assert result.details["btuning"]["teachers"] == ["vit", "cnn"]


@pytest.fixture(scope="module")
def image_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("regularized")
    return {"vit": make_tiny_vit(root / "vit", seed=1), "cnn": make_tiny_mobilenet(root / "cnn", seed=1)}


@pytest.mark.parametrize("regularizer", ["smart", "r3f", "vat", "sift", "lnsr", "hype", "nfm", "self_labeling"])
@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_every_regularizer_tunes_an_image_model(image_models, kind, regularizer, tmp_path) -> None:
    """Embedding-space regularizers perturb the normalised pixels (channel-last, VAT's input space); the
    hidden-state ones act on the ViT's layers or the CNN's blocks (LNSR draws its noise in the shape of the block's
    input, larger than its output where the block is strided); penalties enter the loss."""
    result = train(config(regularizer=regularizer, epochs=1), image_models[kind], TRAIN, VAL, "classification",
                   NAMES, tmp_path / "ckpt", tmp_path / "state")
    assert np.isfinite(result.metrics["val_loss"]) and (tmp_path / "ckpt" / "model.safetensors").is_file()
    if regularizer in ("vat", "lnsr"):  # penalties large enough to see at the defaults
        assert result.curve[-1]["train_total_loss"] > result.curve[-1]["train_loss"]


def test_a_pixel_perturbation_reaches_the_model(image_models) -> None:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from workers.tuning.batches import EncodedImages as _Pixels
    from workers.tuning.regularizers import StepContext

    folder = image_models["cnn"]
    model = AutoModelForImageClassification.from_pretrained(folder, num_labels=3).eval()
    batch = _Pixels(AutoImageProcessor.from_pretrained(folder), VAL.examples[:4], np.zeros(4, dtype=int), "RGB").batch(
        torch.arange(4), torch.device("cpu"), "classification")
    ctx = StepContext(model, batch, "classification")
    with torch.no_grad():
        clean, _ = ctx.clean_forward()
        assert ctx.embeds is not None and ctx.embeds.shape == (4, 32, 32, 3) and ctx.mask.shape == (4, 32, 32)
        same, _ = ctx.forward(perturb=lambda pixels: pixels)
        shifted, _ = ctx.forward(perturb=lambda pixels: pixels + 0.5)
    # (a fresh head's logits are tiny: compare relative to their size)
    assert torch.equal(clean, same) and (clean - shifted).abs().max() > 0.01 * clean.abs().max()

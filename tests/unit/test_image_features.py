"""Image feature extraction against features computed by hand: pixels normalised in numpy, one image at a time."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from tests.tiny_models import make_tiny_clip, make_tiny_mobilenet, make_tiny_vit  # noqa: E402
from workers.features import extract_features, extract_image_features  # noqa: E402


def encoded(array: np.ndarray, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt)
    return out.getvalue()


def random_images(count: int, seed: int, size: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(count)]


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_vit(tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def vit_classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_vit(tmp_path_factory.mktemp("vitclf"), num_labels=4, seed=2)


@pytest.fixture(scope="module")
def mobilenet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_mobilenet(tmp_path_factory.mktemp("mnv2"))


def by_hand(folder: Path, arrays: list[np.ndarray], token: str) -> np.ndarray:
    """ViT's last hidden state for each 32×32 image alone, its pixels scaled to [-1, 1] by hand (the processor's
    resize is the identity at this size), pooled over tokens ("mean") or taking [CLS] ("first")."""
    model = transformers.AutoModel.from_pretrained(folder).eval()
    rows = []
    with torch.no_grad():
        for array in arrays:
            pixels = torch.from_numpy((array.astype(np.float32) / 255.0 - 0.5) / 0.5).permute(2, 0, 1)[None]
            hidden = model(pixel_values=pixels).last_hidden_state[0]
            rows.append((hidden.mean(0) if token == "mean" else hidden[0]).numpy())
    return np.stack(rows)


def test_vit_features_match_one_image_at_a_time(vit_dir: Path) -> None:
    arrays = random_images(7, seed=0)
    result = extract_features(vit_dir, [encoded(a) for a in arrays], batch_size=3)  # bytes: the image path
    assert result.features.shape == (7, 32) and result.features.dtype == np.float32
    np.testing.assert_allclose(result.features, by_hand(vit_dir, arrays, "mean"), atol=1e-5)
    assert result.source_probs is None
    assert result.tokens == result.padded_tokens == 7 and result.padding_waste == 0.0
    assert result.flops_estimate > 0 and result.forward_seconds > 0
    head = extract_image_features(vit_dir, [encoded(a) for a in arrays], batch_size=4, pooling="head")
    np.testing.assert_allclose(head.features, by_hand(vit_dir, arrays, "first"), atol=1e-5)
    with pytest.raises(ValueError):
        extract_image_features(vit_dir, [encoded(arrays[0])], pooling="max")


def test_grayscale_and_jpeg_files_are_read_as_rgb(vit_dir: Path) -> None:
    gray = np.random.default_rng(1).integers(0, 256, size=(32, 32), dtype=np.uint8)
    got = extract_image_features(vit_dir, [encoded(gray)]).features
    np.testing.assert_allclose(got, by_hand(vit_dir, [np.repeat(gray[:, :, None], 3, axis=2)], "mean"), atol=1e-5)
    jpeg = encoded(random_images(1, seed=2)[0], "JPEG")
    assert np.isfinite(extract_image_features(vit_dir, [jpeg]).features).all()


def test_source_head_gives_probabilities_and_base_features(vit_classifier_dir: Path) -> None:
    arrays = random_images(5, seed=3)
    result = extract_image_features(vit_classifier_dir, [encoded(a) for a in arrays], batch_size=2)
    assert result.source_probs is not None and result.source_probs.shape == (5, 4)
    np.testing.assert_allclose(result.source_probs.sum(1), 1.0, atol=1e-5)
    # The features are the backbone's, as for a folder without a head.
    classifier = transformers.AutoModelForImageClassification.from_pretrained(vit_classifier_dir).eval()
    with torch.no_grad():
        pixels = torch.stack([torch.from_numpy((a.astype(np.float32) / 255.0 - 0.5) / 0.5).permute(2, 0, 1)
                              for a in arrays])
        out = classifier(pixel_values=pixels, output_hidden_states=True)
        hidden = classifier.vit.layernorm(out.hidden_states[-1])
    np.testing.assert_allclose(result.features, hidden.mean(1).numpy(), atol=1e-5)
    np.testing.assert_allclose(result.source_probs, torch.softmax(out.logits, -1).numpy(), atol=1e-5)


def test_cnn_feature_maps_are_averaged_over_positions(mobilenet_dir: Path) -> None:
    """MobileNetV2 returns (B, 1280, H, W): "mean" averages the positions, "head" reads pooler_output (what its
    classifier reads: the same global average)."""
    arrays = random_images(4, seed=4, size=40)  # resized to 40 on the short side, cropped to 32
    files = [encoded(a) for a in arrays]
    processor = transformers.AutoImageProcessor.from_pretrained(mobilenet_dir)
    model = transformers.AutoModel.from_pretrained(mobilenet_dir).eval()
    with torch.no_grad():
        pixels = processor(images=[Image.fromarray(a) for a in arrays], return_tensors="pt")["pixel_values"]
        assert pixels.shape == (4, 3, 32, 32)
        maps = model(pixel_values=pixels).last_hidden_state
    expected = maps.mean(dim=(2, 3)).numpy()
    mean = extract_image_features(mobilenet_dir, files, batch_size=3).features
    head = extract_image_features(mobilenet_dir, files, batch_size=3, pooling="head").features
    assert mean.shape == (4, 1280)
    np.testing.assert_allclose(mean, expected, atol=1e-5)
    np.testing.assert_allclose(head, expected, atol=1e-5)


def test_progress_and_cancel(vit_dir: Path) -> None:
    from workers.features import FeatureExtractionCancelled

    files = [encoded(a) for a in random_images(5, seed=5)]
    seen: list[tuple[int, int]] = []
    extract_image_features(vit_dir, files, batch_size=2, on_batch=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(FeatureExtractionCancelled):
        extract_image_features(vit_dir, files, batch_size=2, should_cancel=lambda: len(seen) > 3,
                               on_batch=lambda done, total: seen.append((done, total)))


def test_exif_orientation_is_applied() -> None:
    """A JPEG stored 32 wide and 16 high with orientation 6 ("rotate 90° clockwise to display") is a portrait."""
    from workers.features import decode_images

    out = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (32, 16), (10, 200, 30)).save(out, format="JPEG", exif=exif)
    (upright,) = decode_images([out.getvalue()])
    assert upright.size == (16, 32) and upright.mode == "RGB"


def test_a_dual_encoder_is_read_through_its_vision_tower(tmp_path: Path) -> None:
    """A CLIP folder (text and vision towers): AutoModel's CLIPModel needs token ids too; the features are the
    vision tower's, the same as CLIPVisionModel loaded from the same folder gives."""
    folder = make_tiny_clip(tmp_path / "clip", seed=6)
    files = [encoded(a) for a in random_images(5, seed=7, size=40)]
    got = {pooling: extract_image_features(folder, files, batch_size=2, pooling=pooling).features
           for pooling in ("mean", "head")}
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    tower = transformers.CLIPVisionModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = tower(pixel_values=processor(images=[Image.open(io.BytesIO(f)).convert("RGB") for f in files],
                                           return_tensors="pt")["pixel_values"])
    np.testing.assert_allclose(got["mean"], out.last_hidden_state.mean(1).numpy(), rtol=1e-4, atol=1e-5)
    # "head": what CLIPForImageClassification reads, the mean of the patch tokens without [CLS]
    np.testing.assert_allclose(got["head"], out.last_hidden_state[:, 1:].mean(1).numpy(), rtol=1e-4, atol=1e-5)


def test_a_dual_encoder_image_classifier_ranks_like_its_vision_tower(tmp_path: Path) -> None:
    """A CLIPForImageClassification folder with id2label (what HubTune's own tuning writes) is a source head; its
    features are its vision tower's. It has no `clip` attribute (its base_model_prefix), so hooking "the base
    model" took the whole classifier and failed."""
    folder = make_tiny_clip(tmp_path / "clip", seed=7)
    classifier = transformers.CLIPForImageClassification.from_pretrained(folder, num_labels=3)
    classifier.config.id2label = {0: "a", 1: "b", 2: "c"}
    classifier.save_pretrained(tmp_path / "tuned")
    transformers.AutoImageProcessor.from_pretrained(folder).save_pretrained(tmp_path / "tuned")
    images = [encoded(a) for a in random_images(3, seed=7)]
    tuned = extract_image_features(tmp_path / "tuned", images, device="cpu")
    plain = extract_image_features(folder, images, device="cpu")
    assert tuned.source_probs is not None and tuned.source_probs.shape == (3, 3)
    np.testing.assert_allclose(tuned.features, plain.features, rtol=1e-5, atol=1e-6)


def test_high_bit_depth_and_transparent_images_become_what_a_viewer_shows() -> None:
    """A 16-bit grayscale PNG (microscopy, medical, satellite) was clipped to 255 by PIL's convert: a gradient came
    out almost white. Transparent pixels kept the colour under alpha 0 (here black) instead of the white a viewer
    shows."""
    from workers.features import decode_images

    gradient = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    decoded = np.asarray(decode_images([encoded(gradient)])[0], dtype=np.float64)
    assert decoded.shape == (64, 64, 3)
    np.testing.assert_allclose(decoded[..., 0], np.rint(gradient / 257.0), atol=1)  # the full 16-bit range
    twelve_bit = (gradient // 16).astype(np.uint16)  # 0..4095 in a 16-bit file: dark, as in any viewer
    assert np.asarray(decode_images([encoded(twelve_bit)])[0]).max() == 16

    unit_float = Image.fromarray((gradient / 65535.0).astype(np.float32))  # float TIFF within 0..1
    out = io.BytesIO()
    unit_float.save(out, format="TIFF")
    floats = np.asarray(decode_images([out.getvalue()])[0], dtype=np.float64)[..., 0]
    np.testing.assert_allclose(floats, np.rint(gradient / 65535.0 * 255), atol=1)

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:4] = (200, 30, 30, 255)  # opaque red top half, fully transparent black bottom half
    pixels = np.asarray(decode_images([encoded(rgba)])[0])
    assert (pixels[:4] == (200, 30, 30)).all() and (pixels[4:] == 255).all()
    assert np.asarray(decode_images([encoded(rgba)], mode="L")[0])[4:].min() == 255


def test_batches_prepared_ahead_come_in_order_and_errors_surface_at_their_item() -> None:
    import time

    from workers.features import prepared_in_order

    def slow_square(x: int) -> int:
        time.sleep(0.01 * (x % 3))  # later items can finish first
        if x == 7:
            raise ValueError("corrupt batch 7")
        return x * x

    out = prepared_in_order(slow_square, list(range(10)), ahead=3)
    assert [next(out) for _ in range(7)] == [x * x for x in range(7)]
    with pytest.raises(ValueError, match="batch 7"):
        next(out)
    out.close()

    started: list[int] = []

    def record(x: int) -> int:
        started.append(x)
        return x

    cancelled = prepared_in_order(record, list(range(100)), ahead=2)
    assert next(cancelled) == 0
    cancelled.close()  # a cancelled job: at most the batches already handed to the threads ran
    assert sorted(started) == list(range(len(started))) and len(started) <= 3


def _tiny_vision(folder: Path, kind: str) -> Path:
    """Tiny headless Swin, DINOv2 and BEiT (mean pooling) folders on 32×32 images, the ViT processor beside them."""
    torch.manual_seed(5)
    t = transformers
    model = {
        "swin": lambda: t.SwinModel(t.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 2],
                                                 num_heads=[1, 2], window_size=4)),
        "dinov2": lambda: t.Dinov2Model(t.Dinov2Config(image_size=32, patch_size=8, hidden_size=16,
                                                       num_hidden_layers=2, num_attention_heads=2)),
        "beit": lambda: t.BeitModel(t.BeitConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=32, use_mean_pooling=True)),
    }[kind]()
    model.save_pretrained(folder)
    t.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["swin", "dinov2", "beit", "clip", "vit", "cnn"])
def test_head_pooling_is_what_the_architectures_classifier_reads(kind: str, tmp_path: Path) -> None:
    """"head" takes the input of the *ForImageClassification's last linear layer, computed here from the headless
    model by each architecture's own rule: Swin and BEiT (mean pooling) their pooler output, DINOv2 [CLS] beside
    the mean of the patch tokens (twice the width), CLIP the mean of the patch tokens without [CLS], ViT [CLS],
    a CNN its pooled feature map. The first token, as before, was right for ViT only."""
    folder = {"swin": lambda: _tiny_vision(tmp_path / "m", "swin"),
              "dinov2": lambda: _tiny_vision(tmp_path / "m", "dinov2"),
              "beit": lambda: _tiny_vision(tmp_path / "m", "beit"),
              "clip": lambda: make_tiny_clip(tmp_path / "m", seed=5),
              "vit": lambda: make_tiny_vit(tmp_path / "m", seed=5),
              "cnn": lambda: make_tiny_mobilenet(tmp_path / "m", seed=5)}[kind]()
    images = [encoded(a) for a in random_images(3, seed=9)]
    got = extract_image_features(folder, images, device="cpu", pooling="head").features
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    from workers.features import decode_images

    pixels = processor(images=decode_images(images), return_tensors="pt")["pixel_values"]
    model = (transformers.CLIPVisionModel if kind == "clip" else transformers.AutoModel).from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(pixel_values=pixels)
    hidden = out.last_hidden_state
    want = {"swin": lambda: out.pooler_output,
            "beit": lambda: out.pooler_output,
            "dinov2": lambda: torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=1),
            "clip": lambda: hidden[:, 1:].mean(1),
            "vit": lambda: hidden[:, 0],
            "cnn": lambda: out.pooler_output.flatten(1)}[kind]().numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

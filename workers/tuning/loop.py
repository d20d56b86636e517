"""The one training loop: fine-tuning with a regularizer, or B-Tuning, for sequence classification/regression.

Why plain PyTorch and not transformers' Trainer: the regularizers need to reach into the step, not around it:
rerun the forward with perturbed input embeddings and the same dropout masks (SMART, R3F, VAT, SiFT, LNSR),
replace the forward and the targets (noisy feature mixup), change labels and per-example loss weights
(self-labeling), project weights after the optimizer step (self-labeling), read pooled hidden states with dataset
indices (B-Tuning). With Trainer each of those is a `compute_loss` override plus callbacks that cannot see the
loss or run after `optimizer.step()` in the right place, and its resume (`resume_from_checkpoint`) restores whole
checkpoints per `save_steps` but not our pieces' state (corrected labels) or a bit-exact data order mid-epoch.
Here resume state, the per-step cancel check, and the order of every hook are explicit, in about 300 lines.

Public entry: `train(...)` (signature below). Contract:
- Deterministic on CPU: the same config (seed), data and model give bit-identical weights and validation metrics.
  The data order of epoch e is a permutation drawn from its own generator seeded by (seed, e); dropout and every
  regularizer's noise draw from torch's global generator, seeded once, saved and restored on resume.
- Cancel: `should_cancel()` is called before every optimiser step; when it returns True, `TuningCancelled` is
  raised. Nothing is written under `checkpoint_dir` before training has finished (see checkpoint.py), so a
  cancelled run leaves no checkpoint, half-written or not. The resume state in `state_dir` is kept.
- Resume: every `save_every_steps` steps the full training state (model, optimizer, scheduler, random states,
  step, loss curve, regularizer state, elapsed time) is written to `state_dir/state.pt` atomically. If that file
  exists and was written for the same run (a fingerprint of config, model, data and teacher), training continues
  from it: a worker killed mid-training resumes, it does not restart. When training ends, the checkpoint is
  written, the result is saved as `state_dir/result.json`, and `state.pt` is removed; calling `train` again for
  the same run then returns that result without training (a re-delivered task after success).
- GPU: bf16 autocast of the forward passes when the device is CUDA (`config.bf16`); weights stay float32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from workers.tuning.btuning import BTuningLoss, BTuningTeacher
from workers.tuning.checkpoint import (
    discard_partial,
    load_state,
    save_state_atomic,
    write_checkpoint,
    write_json_atomic,
)
from workers.tuning.metrics import MAIN_METRIC, task_metrics
from service.contract import TASKS, TuneConfig
from workers.tuning.regularizers import (
    Regularizer,
    SetupInfo,
    StepContext,
    build_regularizer,
    per_example_loss,
)
from workers.tuning.target_scale import TargetScale, fold_into_head

log = logging.getLogger("hubtune.tuning")

STATE_FILE = "state.pt"
RESULT_FILE = "result.json"
STATE_VERSION = 2  # 2: regression trains on standardised targets (target_scale)


class TextDataset(NamedTuple):
    """texts and labels: (N,) ints for classification, (N, C) 0/1 for multilabel, (N,) or (N, T) floats for
    regression. `texts` may hold text pairs (tuples, read as the tokenizer's pair), or encoded image files (bytes):
    the model is then an image classifier."""

    texts: list[str] | list[tuple[str, str]] | list[bytes]
    labels: np.ndarray


def holds_images(data: TextDataset) -> bool:
    return len(data.texts) > 0 and isinstance(data.texts[0], (bytes, bytearray))


class TuningCancelled(Exception):
    """Raised by `train` when `should_cancel()` returned True; `step` is the number of steps completed."""

    def __init__(self, step: int) -> None:
        super().__init__(f"tuning cancelled after {step} steps")
        self.step = step


@dataclass
class TuneResult:
    """What a finished run reports. metrics keys by task: classification {val_loss, accuracy, macro_f1, ece};
    multilabel {val_loss, micro_f1, macro_f1, ece}; regression {val_loss, rmse, r2}. curve: one point per
    evaluation (end of each epoch, and every eval_every_steps): {step, epoch, train_loss (mean task loss since the
    previous point), train_total_loss (with the regularizer's terms), val_loss, val_<main metric>}."""

    task: str
    metrics: dict[str, float | None]
    curve: list[dict[str, Any]]
    wall_seconds: float
    steps: int
    total_steps: int
    resumed_from_step: int
    checkpoint_dir: str
    config: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TuneResult":
        return cls(**data)


# --------------------------------------------------------------------------------------------------- helpers


def _problem_type(task: str) -> str:
    return {"classification": "single_label_classification", "multilabel": "multi_label_classification",
            "regression": "regression"}[task]


def _check_labels(task: str, data: TextDataset, num_labels: int | None, where: str) -> np.ndarray:
    texts, labels = data
    y = np.asarray(labels)
    if len(texts) != len(y):
        raise ValueError(f"{where}: {len(texts)} texts but {len(y)} labels")
    if task == "classification":
        if y.ndim != 1 or (y.size and not np.all(np.mod(y, 1) == 0)):
            raise ValueError(f"{where}: classification labels must be integers of shape (N,)")
        y = y.astype(np.int64)
        if y.size and (y.min() < 0 or (num_labels is not None and y.max() >= num_labels)):
            raise ValueError(f"{where}: labels must be in 0..{(num_labels or 0) - 1}")
    elif task == "multilabel":
        if y.ndim != 2 or not np.all((y == 0) | (y == 1)):
            raise ValueError(f"{where}: multilabel labels must be 0/1 of shape (N, C)")
        y = y.astype(np.float32)
    else:
        y = y.astype(np.float32)
        if y.ndim == 1:
            y = y[:, None]
        if y.ndim != 2 or not np.all(np.isfinite(y)):
            raise ValueError(f"{where}: regression targets must be finite, shape (N,) or (N, T)")
    return y


def _fingerprint(config: TuneConfig, model_dir: Path, train: TextDataset, val: TextDataset, task: str,
                 label_names: list[str] | None, teacher: BTuningTeacher | None) -> str:
    """Identifies a run: resuming is only allowed into the state of the same run."""
    settings = config.to_dict()
    for key in ("save_every_steps", "device", "eval_every_steps"):
        settings.pop(key, None)
    h = hashlib.sha256()
    h.update(json.dumps({"config": settings, "model": str(Path(model_dir).resolve()), "task": task,
                         "labels": label_names}, sort_keys=True, default=str).encode())
    for data in (train, val):
        if holds_images(data):
            for image in data.texts:
                h.update(hashlib.sha256(image).digest())
        else:
            h.update(json.dumps(list(data.texts)).encode())
        h.update(np.ascontiguousarray(np.asarray(data.labels, dtype=np.float64)).tobytes())
    if teacher is not None:
        h.update(np.ascontiguousarray(teacher.target).tobytes())
        h.update(np.ascontiguousarray(teacher.student_weights).tobytes())
        h.update(teacher.pooling.encode())
    return h.hexdigest()


@contextmanager
def _quiet_transformers():
    """Load reports and progress bars would flood a worker's log; restore the caller's settings after."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _epoch_order(seed: int, epoch: int, n: int) -> Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + 17) % (2**63 - 1))
    return torch.randperm(n, generator=g)


class _Encoded:
    """Texts tokenized once; batches padded on the fly (dynamic padding)."""

    def __init__(self, tokenizer: Any, texts: list[str] | list[tuple[str, str]], labels: np.ndarray,
                 max_length: int, token_types: bool = True) -> None:
        from workers.features import pair_inputs

        # (no texts: a validation split can be empty when every class has one example; tokenizers fail on [])
        inputs = pair_inputs(tokenizer, texts) if len(texts) and isinstance(texts[0], tuple) else (list(texts),)
        enc = tokenizer(*inputs, truncation=True, max_length=max_length) if len(texts) else {"input_ids": []}
        self.input_ids = enc["input_ids"]
        # token_types False: the model has no second token type (features.takes_token_types), whatever the
        # tokenizer declares
        self.token_type_ids = enc.get("token_type_ids") if token_types else None
        self.labels = labels
        self.pad_id = int(tokenizer.pad_token_id)
        self.left = getattr(tokenizer, "padding_side", "right") == "left"

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, index: Tensor, device: torch.device, task: str) -> dict[str, Tensor]:
        rows = index.tolist()
        width = max(len(self.input_ids[i]) for i in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long) if self.token_type_ids is not None else None
        for r, i in enumerate(rows):
            seq = self.input_ids[i]
            sl = slice(width - len(seq), width) if self.left else slice(0, len(seq))
            ids[r, sl] = torch.tensor(seq, dtype=torch.long)
            mask[r, sl] = 1
            if types is not None:
                types[r, sl] = torch.tensor(self.token_type_ids[i], dtype=torch.long)
        y = self.labels[rows]
        labels = torch.as_tensor(y, dtype=torch.long if task == "classification" else torch.float32)
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": index.clone().long()}
        if types is not None:
            out["token_type_ids"] = types
        return {k: v.to(device) for k, v in out.items()}


class _Pixels:
    """Encoded images, decoded and run through the model's image processor per batch (holding every image as
    224×224 floats would take 0.6 MB each)."""

    def __init__(self, processor: Any, images: list[bytes], labels: np.ndarray, mode: str) -> None:
        self.processor, self.images, self.labels, self.mode = processor, images, labels, mode

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, index: Tensor, device: torch.device, task: str) -> dict[str, Tensor]:
        from workers.features import decode_images

        rows = index.tolist()
        pixels = self.processor(images=decode_images([self.images[i] for i in rows], self.mode),
                                return_tensors="pt")["pixel_values"]
        labels = torch.as_tensor(self.labels[rows], dtype=torch.long if task == "classification" else torch.float32)
        out = {"pixel_values": pixels, "labels": labels, "index": index.clone().long()}
        return {k: v.to(device) for k, v in out.items()}


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")


def _optimizer(model: nn.Module, config: TuneConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)  # biases and norm weights are not decayed
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr)


def _scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:  # linear warmup, then linear decay to 0
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _evaluate(model: nn.Module, data: _Encoded | _Pixels, task: str, device: torch.device, batch_size: int,
              autocast: Callable[[], Any], scale: TargetScale | None = None) -> dict[str, float | None]:
    """Validation loss and metrics; regression outputs read back on the targets' own scale when the model trains on
    standardised ones (`scale`), so the loss is the MSE of y itself."""
    if len(data) == 0:
        return {"val_loss": None}
    model.eval()
    outputs, losses = [], []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            index = torch.arange(start, min(len(data), start + batch_size))
            batch = data.batch(index, device, task)
            kwargs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
            with autocast():
                logits = model(**kwargs).logits.float()
            if scale is not None:
                logits = scale.restore(logits)
            losses.append(per_example_loss(logits, batch["labels"], task).cpu())
            outputs.append(logits.cpu())
    out = torch.cat(outputs).numpy()
    metrics: dict[str, float | None] = {"val_loss": float(torch.cat(losses).mean())}
    metrics.update(task_metrics(task, out, data.labels))
    return metrics


# --------------------------------------------------------------------------------------------------- the loop


def train(config: TuneConfig, model_dir: Path, train: TextDataset, val: TextDataset, task: str,
          label_names: list[str] | None, checkpoint_dir: Path | None, state_dir: Path | None,
          on_progress: Callable[[dict], None] | None = None, should_cancel: Callable[[], bool] | None = None,
          teacher: BTuningTeacher | None = None, *, card: dict[str, Any] | None = None) -> TuneResult:
    """Tune the model in `model_dir` (a Hugging Face folder) on `train`, evaluate on `val`, and write a checkpoint
    folder to `checkpoint_dir` (see the module docstring for determinism, cancel and resume).

    label_names: class (or label) names for id2label/label2id; None gives "LABEL_i" (regression: ignored).
    teacher: required when config.strategy == "btuning" (rows in the order of `train`).
    checkpoint_dir, state_dir: None for a trial run that only reports its validation metrics (choosing B-Tuning's
        tradeoff): nothing is written, and it neither resumes nor can be resumed.
    card: extra fields for the model card, e.g. {"base_model", "base_revision", "dataset_sha256", "name"};
        strategy, regularizer, hyper-parameters, seed and scores are added here.
    """
    from transformers import AutoImageProcessor, AutoModelForSequenceClassification, AutoTokenizer

    from workers.features import image_classifier, length_limit, takes_token_types

    began = time.perf_counter()
    config = TuneConfig.from_dict(config if isinstance(config, dict) else asdict(config))  # a validated copy
    if task not in TASKS:
        raise ValueError(f"task: must be one of {list(TASKS)}, got {task!r}")
    model_dir = Path(model_dir)
    if checkpoint_dir is None or state_dir is None:
        checkpoint_dir = state_dir = None  # a trial run
    else:
        checkpoint_dir, state_dir = Path(checkpoint_dir), Path(state_dir)
    train, val = TextDataset(*train), TextDataset(*val)
    images = holds_images(train)
    if config.strategy == "btuning" and teacher is None:
        raise ValueError("teacher: B-Tuning needs the teachers' features and LogME weights (BTuningTeacher)")

    if task == "regression":
        y_probe = np.asarray(train.labels)
        num_labels = 1 if y_probe.ndim == 1 else int(y_probe.shape[1])
    elif task == "multilabel":
        num_labels = int(np.asarray(train.labels).shape[1])
    else:
        num_labels = len(label_names) if label_names else int(np.max(train.labels)) + 1
    y_train = _check_labels(task, train, num_labels if task == "classification" else None, "train")
    y_val = _check_labels(task, val, num_labels if task == "classification" else None, "val")
    if len(y_train) == 0:
        raise ValueError("train: no examples")
    # regression trains on standardised targets (a new head starts at 0, far from targets like prices or years)
    scale = TargetScale.fit(y_train) if task == "regression" else None
    y_fit = scale.standardise(y_train) if scale is not None else y_train
    if label_names and len(label_names) != num_labels and task != "regression":
        raise ValueError(f"label_names: {len(label_names)} names for {num_labels} labels")
    names = list(label_names) if label_names and task != "regression" else [f"LABEL_{i}" for i in range(num_labels)]

    fingerprint = _fingerprint(config, model_dir, train, val, task, label_names, teacher)
    result_path = state_path = None
    if checkpoint_dir is not None and state_dir is not None:
        result_path = state_dir / RESULT_FILE
        state_path = state_dir / STATE_FILE
        if result_path.exists() and checkpoint_dir.exists():
            done = json.loads(result_path.read_text(encoding="utf-8"))
            if done.get("fingerprint") == fingerprint:
                return TuneResult.from_dict(done["result"])
        discard_partial(checkpoint_dir)

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_bf16 = bool(config.bf16 and device.type == "cuda")  # revisited once the pieces are known

    def autocast() -> Any:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()

    torch.manual_seed(config.seed)  # the head's initialisation
    head = dict(num_labels=num_labels, problem_type=_problem_type(task), id2label=dict(enumerate(names)),
                label2id={n: i for i, n in enumerate(names)},
                ignore_mismatched_sizes=True, dtype=torch.float32)  # transformers 5 defaults to the file's dtype
    train_data: _Encoded | _Pixels
    val_data: _Encoded | _Pixels
    with _quiet_transformers():
        if images:
            # a source head of another size (ImageNet's 1000 classes) is replaced by a new one
            preprocessor = AutoImageProcessor.from_pretrained(model_dir)
            model = image_classifier(model_dir, head)
            mode = "L" if getattr(model.config, "num_channels", 3) == 1 else "RGB"
            train_data = _Pixels(preprocessor, list(train.texts), y_fit, mode)
            val_data = _Pixels(preprocessor, list(val.texts), y_val, mode)
        else:
            preprocessor = AutoTokenizer.from_pretrained(model_dir)
            if preprocessor.pad_token is None:  # decoder tokenizers (Llama) often have none
                preprocessor.pad_token = preprocessor.eos_token or preprocessor.unk_token
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, **head)
            model.config.pad_token_id = preprocessor.pad_token_id
            # what the model can read: a longer max_length overflowed its position embeddings mid-training
            max_length = length_limit(preprocessor, model, config.max_length)
            token_types = takes_token_types(model.config)
            train_data = _Encoded(preprocessor, train.texts, y_fit, max_length, token_types)
            val_data = _Encoded(preprocessor, val.texts, y_val, max_length, token_types)
    model.to(device)
    n = len(train_data)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    warmup = int(config.warmup_ratio * total_steps)

    pieces: list[Regularizer] = [build_regularizer(config.regularizer, config.regularizer_params)]
    if config.strategy == "btuning":
        pieces.append(BTuningLoss(teacher, config.tradeoff))
    train_labels = torch.as_tensor(y_fit, dtype=torch.long if task == "classification" else torch.float32)
    info = SetupInfo(task=task, train_labels=train_labels, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    for piece in pieces:
        piece.setup(model, info)
    want_hidden = any(p.needs_hidden_states for p in pieces)
    use_bf16 = use_bf16 and not any(p.needs_fp32 for p in pieces)

    optimizer = _optimizer(model, config)
    scheduler = _scheduler(optimizer, warmup, total_steps)

    step, resumed_from = 0, 0
    curve: list[dict[str, Any]] = []
    interval = [0.0, 0.0, 0]  # task loss sum, total loss sum, steps since the last curve point
    elapsed_before = 0.0
    state = load_state(state_path, map_location=device) if state_path is not None and state_path.exists() else None
    if state is not None and state.get("fingerprint") == fingerprint and state.get("version") == STATE_VERSION:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for piece, piece_state in zip(pieces, state["pieces"]):
            piece.load_state_dict(piece_state)
        torch.set_rng_state(state["rng_cpu"].cpu())
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), device)
        step = resumed_from = int(state["step"])
        curve = list(state["curve"])
        interval = list(state["interval"])
        elapsed_before = float(state["wall_seconds"])
        log.info("resuming %s from step %d of %d", model_dir, step, total_steps)
    elif state is not None:
        log.warning("ignoring a training state in %s written for a different run", state_dir)
    del state

    def save_state() -> None:
        save_state_atomic({
            "version": STATE_VERSION, "fingerprint": fingerprint, "step": step,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "pieces": [p.state_dict() for p in pieces], "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "curve": curve, "interval": interval,
            "wall_seconds": elapsed_before + time.perf_counter() - began,
        }, state_path)

    order: Tensor | None = None
    order_epoch = -1
    last_eval: dict[str, float | None] | None = None
    eval_batch = max(1, 2 * config.batch_size)
    while step < total_steps:
        if should_cancel is not None and should_cancel():
            raise TuningCancelled(step)
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = _epoch_order(config.seed, epoch, n), epoch
        index = order[pos * config.batch_size:(pos + 1) * config.batch_size]
        batch = train_data.batch(index, device, task)

        model.train()
        ctx = StepContext(model, batch, task, step=step, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                          want_hidden=want_hidden)
        with autocast():
            override = None
            for piece in pieces:
                override = piece.forward_loss(ctx)
                if override is not None:
                    break
            if override is not None:
                task_loss = override[1]
            else:
                logits, _ = ctx.clean_forward()
                labels = batch["labels"]
                for piece in pieces:
                    labels = piece.relabel(ctx, labels)
                losses = per_example_loss(logits, labels, task)
                weights = None
                for piece in pieces:
                    weights = piece.example_weights(ctx, losses)
                    if weights is not None:
                        break
                task_loss = losses.mean() if weights is None else (weights * losses).sum()
            loss = task_loss
            for piece in pieces:
                extra = piece.extra_loss(ctx)
                if extra is not None:
                    loss = loss + extra
        loss.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for piece in pieces:
            piece.after_step(model)
        step += 1
        interval[0] += float(task_loss.detach())
        interval[1] += float(loss.detach())
        interval[2] += 1

        at_epoch_end = step % steps_per_epoch == 0
        at_eval = at_epoch_end or (config.eval_every_steps > 0 and step % config.eval_every_steps == 0)
        progress: dict[str, Any] = {"step": step, "total_steps": total_steps, "epoch": step / steps_per_epoch,
                                    "train_loss": interval[0] / max(1, interval[2])}
        if at_eval:
            last_eval = _evaluate(model, val_data, task, device, eval_batch, autocast, scale)
            point = {"step": step, "epoch": step / steps_per_epoch,
                     "train_loss": interval[0] / max(1, interval[2]),
                     "train_total_loss": interval[1] / max(1, interval[2]),
                     "val_loss": last_eval.get("val_loss")}
            main = MAIN_METRIC[task]
            if main in last_eval:
                point[f"val_{main}"] = last_eval[main]
            curve.append(point)
            interval = [0.0, 0.0, 0]
            progress["val_loss"] = last_eval.get("val_loss")
        if on_progress is not None:
            on_progress(progress)
        if state_path is not None and config.save_every_steps > 0 and step % config.save_every_steps == 0 \
                and step < total_steps:
            save_state()

    if last_eval is None:  # resumed exactly at the end: evaluate the restored weights
        last_eval = _evaluate(model, val_data, task, device, eval_batch, autocast, scale)
    for piece in pieces:
        piece.teardown(model)
    scaling = None
    if scale is not None and checkpoint_dir is not None:  # the checkpoint predicts y itself (see target_scale)
        probe_data = val_data if len(val_data) else train_data
        probe = probe_data.batch(torch.arange(min(len(probe_data), eval_batch)), device, task)
        scaling = fold_into_head(model, scale, {k: probe[k] for k in MODEL_INPUTS if k in probe})

    details: dict[str, Any] = {"device": str(device), "bf16": use_bf16}
    if not images:
        details["max_length"] = max_length  # config.max_length capped by the model's positions
    if scaling is not None:
        details["target_scaling"] = scaling
    for piece in pieces:
        if piece.name == "self_labeling":
            details["labels_changed"] = getattr(piece, "changed", 0)
        if piece.name == "btuning":
            details["btuning"] = piece.teacher.describe()
    wall = elapsed_before + time.perf_counter() - began
    config_dict = config.to_dict()
    result = TuneResult(task=task, metrics=last_eval, curve=curve, wall_seconds=wall, steps=step,
                        total_steps=total_steps, resumed_from_step=resumed_from,
                        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir is not None else "",
                        config=config_dict, details=details)
    if checkpoint_dir is None or state_dir is None or result_path is None or state_path is None:
        return result  # a trial run: nothing to keep (all four are None together)
    record = dict(card or {})
    record.update({
        "task": task, "modality": "image" if images else "text",
        "label_names": names if task != "regression" else None, "strategy": config.strategy,
        "regularizer": {"name": config.regularizer, "params": config.resolved_regularizer_params()},
        "hyperparameters": config_dict, "seed": config.seed, "scores": last_eval, "steps": step,
        "wall_seconds": round(wall, 3), "device": str(device), "bf16": use_bf16,
        **({"btuning": details["btuning"]} if "btuning" in details else {}),
        **({"target_scaling": scaling} if scaling is not None else {}),
    })
    model.eval()
    with _quiet_transformers():
        write_checkpoint(model, preprocessor, checkpoint_dir, record)
    write_json_atomic(result_path, {"fingerprint": fingerprint, "result": result.to_dict()})
    if state_path.exists():
        state_path.unlink()
    return result

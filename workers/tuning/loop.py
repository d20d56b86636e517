"""The one training loop: fine-tuning with a regularizer, or B-Tuning, for sequence classification/regression.

Why plain PyTorch and not transformers' Trainer: the regularizers need to reach into the step, not around it:
rerun the forward with perturbed input embeddings and the same dropout masks (SMART, R3F, VAT, SiFT, LNSR),
replace the forward and the targets (noisy feature mixup), change labels and per-example loss weights
(self-labeling), project weights after the optimizer step (self-labeling), read pooled hidden states with dataset
indices (B-Tuning). With Trainer each of those is a `compute_loss` override plus callbacks that cannot see the
loss or run after `optimizer.step()` in the right place, and its resume (`resume_from_checkpoint`) restores whole
checkpoints per `save_steps` but not our pieces' state (corrected labels) or a bit-exact data order mid-epoch.
Here resume state, the per-step cancel check, and the order of every hook are explicit (`_Trainer`, below).

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from service.contract import TASKS, TuneConfig, check_tune_for_dataset
from workers.tuning.adapters import parameter_counts
from workers.tuning.batches import AugmentedTexts, Batches, EncodedImages, EncodedTexts, epoch_order, model_inputs
from workers.tuning.btuning import BTuningLoss, BTuningTeacher
from workers.tuning.checkpoint import (
    discard_partial,
    load_state,
    save_state_atomic,
    write_checkpoint,
    write_json_atomic,
)
from workers.tuning.data import ExampleDataset, check_labels, holds_images, label_count
from workers.tuning.evaluation import MAIN_METRIC, evaluation_diagnostics, ood_auroc, task_metrics
from workers.tuning.regularizers import (
    Regularizer,
    SetupInfo,
    StepContext,
    build_regularizer,
    per_example_loss,
)
from workers.tuning.regularizers.base import get_rng_state, set_rng_state
from workers.tuning.target_scale import TargetScale, fold_into_head

log = logging.getLogger("hubtune.tuning")

STATE_FILE = "state.pt"
RESULT_FILE = "result.json"
STATE_VERSION = 2  # 2: regression trains on standardised targets (target_scale)



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
    previous point), train_total_loss (with the regularizer's terms), val_loss, val_<main metric>}. details holds
    the run's facts (device, bf16...) and the diagnostics of its last validation pass (evaluation_diagnostics)."""

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
    def from_dict(cls, data: dict[str, Any]) -> TuneResult:
        return cls(**data)


# --------------------------------------------------------------------------------------------------- helpers


def _problem_type(task: str) -> str:
    return {"classification": "single_label_classification", "multilabel": "multi_label_classification",
            "regression": "regression"}[task]


def _fingerprint(config: TuneConfig, model_dir: Path, train: ExampleDataset, val: ExampleDataset, task: str,
                 label_names: list[str] | None, teacher: BTuningTeacher | None) -> str:
    """Identifies a run: resuming is only allowed into the state of the same run."""
    settings = config.to_dict()
    for key in ("save_every_steps", "device", "eval_every_steps"):
        settings.pop(key, None)
    if settings.get("head") == "linear":  # a linear head's runs keep the fingerprint they had before heads existed
        settings.pop("head")
        settings.pop("sngp")
    if settings.get("softdecay") is None:  # so do runs without SoftDecay
        settings.pop("softdecay", None)
    h = hashlib.sha256()
    h.update(json.dumps({"config": settings, "model": str(Path(model_dir).resolve()), "task": task,
                         "labels": label_names}, sort_keys=True, default=str).encode())
    for data in (train, val):
        if holds_images(data):
            for image in data.examples:
                h.update(hashlib.sha256(image).digest())
        else:
            h.update(json.dumps(list(data.examples)).encode())
        h.update(np.ascontiguousarray(np.asarray(data.labels, dtype=np.float64)).tobytes())
    if teacher is not None:
        h.update(np.ascontiguousarray(teacher.target).tobytes())
        h.update(np.ascontiguousarray(teacher.student_weights).tobytes())
        h.update(teacher.pooling.encode())
    return h.hexdigest()


@contextmanager
def _quiet_transformers() -> Iterator[None]:
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


def _evaluate(model: nn.Module, data: Batches, task: str, device: torch.device, batch_size: int,
              autocast: Callable[[], Any], scale: TargetScale | None = None
              ) -> tuple[dict[str, float | None], np.ndarray | None]:
    """Validation loss and metrics, and the outputs they were computed from; regression outputs read back on the
    targets' own scale when the model trains on standardised ones (`scale`), so the loss is the MSE of y itself."""
    if len(data) == 0:
        return {"val_loss": None}, None
    model.eval()
    outputs, losses = [], []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            index = torch.arange(start, min(len(data), start + batch_size))
            batch = data.batch(index, device, task)
            with autocast():
                logits = model(**model_inputs(batch)).logits.float()
            if scale is not None:
                logits = scale.restore(logits)
            losses.append(per_example_loss(logits, batch["labels"], task).cpu())
            outputs.append(logits.cpu())
    out = torch.cat(outputs).numpy()
    metrics: dict[str, float | None] = {"val_loss": float(torch.cat(losses).mean())}
    metrics.update(task_metrics(task, out, data.labels))
    return metrics, out


def _predict(model: nn.Module, data: Batches, task: str, device: torch.device, batch_size: int,
             autocast: Callable[[], Any]) -> np.ndarray:
    """The model's eval-mode outputs of every row of `data` (N, C)."""
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = data.batch(torch.arange(start, min(len(data), start + batch_size)), device, task)
            with autocast():
                outputs.append(model(**model_inputs(batch)).logits.float().cpu())
    return torch.cat(outputs).numpy()


def _ood_batches(loaded: _Loaded, examples: list[Any] | None) -> Batches | None:
    """The out-of-distribution rows encoded as the validation rows are (their labels are not read)."""
    if not examples:
        return None
    from workers.features import takes_token_types

    labels = np.zeros(len(examples), dtype=np.int64)
    if isinstance(loaded.val, EncodedImages):
        if not holds_images(ExampleDataset(examples, labels)):
            raise ValueError("ood: out-of-distribution rows must be images, as the dataset's")
        return EncodedImages(loaded.preprocessor, list(examples), labels, loaded.val.mode)
    if holds_images(ExampleDataset(examples, labels)):
        raise ValueError("ood: out-of-distribution rows must be texts, as the dataset's")
    return EncodedTexts(loaded.preprocessor, list(examples), labels, loaded.max_length,
                        takes_token_types(loaded.model.config))


# ------------------------------------------------------------------------------------------------- setting up


@dataclass
class _Targets:
    """A run's labels, checked: the head's size and names, and the targets fitted and validated."""

    num_labels: int
    names: list[str]
    fit: np.ndarray  # the training targets as trained on (standardised for regression)
    val: np.ndarray
    scale: TargetScale | None  # regression: the standardisation, undone when evaluating and saving


def _targets(task: str, train: ExampleDataset, val: ExampleDataset, label_names: list[str] | None) -> _Targets:
    num_labels = label_count(task, train.labels, label_names)
    y_train = check_labels(task, train, num_labels if task == "classification" else None, "train")
    y_val = check_labels(task, val, num_labels if task == "classification" else None, "val")
    if len(y_train) == 0:
        raise ValueError("train: no examples")
    # regression trains on standardised targets (a new head starts at 0, far from targets like prices or years)
    scale = TargetScale.fit(y_train) if task == "regression" else None
    y_fit = scale.standardise(y_train) if scale is not None else y_train
    if label_names and len(label_names) != num_labels and task != "regression":
        raise ValueError(f"label_names: {len(label_names)} names for {num_labels} labels")
    names = list(label_names) if label_names and task != "regression" else [f"LABEL_{i}" for i in range(num_labels)]
    return _Targets(num_labels=num_labels, names=names, fit=y_fit, val=y_val, scale=scale)


@dataclass
class _Loaded:
    """The pretrained model with its new head, its tokenizer or image processor, and the batches it reads."""

    model: nn.Module
    preprocessor: Any
    train: Batches
    val: Batches
    max_length: int | None  # texts: config.max_length capped by the model's positions; images: None
    peft: Any = None  # the PeftModel wrapping `model` when LoRA adapters train (workers/tuning/adapters.py)
    adapter: dict[str, Any] | None = None  # what was adapted
    sngp: dict[str, Any] | None = None  # the SNGP head installed (workers/tuning/sngp.py), written to sngp.json

    @property
    def modality(self) -> str:
        return "image" if isinstance(self.train, EncodedImages) else "text"


def _load_model(config: TuneConfig, model_dir: Path, train: ExampleDataset, val: ExampleDataset, task: str,
                targets: _Targets, device: torch.device) -> _Loaded:
    from transformers import AutoImageProcessor, AutoModelForSequenceClassification, AutoTokenizer

    from workers.features import image_classifier, length_limit, takes_token_types

    torch.manual_seed(config.seed)  # the head's initialisation
    names = targets.names
    head = dict(num_labels=targets.num_labels, problem_type=_problem_type(task), id2label=dict(enumerate(names)),
                label2id={n: i for i, n in enumerate(names)},
                ignore_mismatched_sizes=True, dtype=torch.float32)  # transformers 5 defaults to the file's dtype
    with _quiet_transformers():
        if holds_images(train):
            check_tune_for_dataset({"augment": config.augment, "softdecay": config.softdecay}, "image")
            # a source head of another size (ImageNet's 1000 classes) is replaced by a new one
            preprocessor = AutoImageProcessor.from_pretrained(model_dir)
            model = image_classifier(model_dir, head)
            mode = "L" if getattr(model.config, "num_channels", 3) == 1 else "RGB"
            loaded = _Loaded(model, preprocessor, EncodedImages(preprocessor, list(train.examples), targets.fit, mode),
                             EncodedImages(preprocessor, list(val.examples), targets.val, mode), None)
        else:
            preprocessor = AutoTokenizer.from_pretrained(model_dir)
            if preprocessor.pad_token is None:  # decoder tokenizers (Llama) often have none
                preprocessor.pad_token = preprocessor.eos_token or preprocessor.unk_token
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, **head)
            model.config.pad_token_id = preprocessor.pad_token_id
            # what the model can read: a longer max_length overflowed its position embeddings mid-training
            max_length = length_limit(preprocessor, model, config.max_length)
            token_types = takes_token_types(model.config)
            train_batches = (AugmentedTexts(preprocessor, train.examples, targets.fit, max_length, token_types,
                                            config.augment, config.seed) if config.augment is not None else
                             EncodedTexts(preprocessor, train.examples, targets.fit, max_length, token_types))
            loaded = _Loaded(model, preprocessor, train_batches,
                             EncodedTexts(preprocessor, val.examples, targets.val, max_length, token_types),
                             max_length)
    if config.head == "sngp":
        from workers.tuning.sngp import install_sngp_head

        check_tune_for_dataset({"head": config.head}, loaded.modality, task=task)
        loaded.sngp = install_sngp_head(model, config.sngp, targets.num_labels)  # drawn after the HF head's init
    if config.softdecay is not None:  # on the last block before peft wraps it; part of the model from now on
        from workers.tuning.softdecay import install_softdecay

        install_softdecay(model, config.softdecay)
    if config.peft is not None:
        from workers.tuning.adapters import attach_lora

        loaded.peft, loaded.adapter = attach_lora(model, config.peft, loaded.modality)
    model.to(device)
    return loaded


# --------------------------------------------------------------------------------------------------- the loop


class _Trainer:
    """One run's training state (model, optimizer, schedule, pieces, step, loss curve) and its steps: resume, one
    optimizer step, an evaluation point, save state, finish."""

    def __init__(self, config: TuneConfig, loaded: _Loaded, task: str, targets: _Targets, device: torch.device,
                 teacher: BTuningTeacher | None, fingerprint: str, began: float) -> None:
        self.config, self.task, self.device, self.scale = config, task, device, targets.scale
        self.model, self.train_data, self.val_data = loaded.model, loaded.train, loaded.val
        self.fingerprint, self.began = fingerprint, began
        self.sngp = loaded.sngp is not None
        self.precision_rows = 0  # SNGP: training rows in the Laplace precision
        self.steps_per_epoch = math.ceil(len(self.train_data) / config.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.pieces: list[Regularizer] = [build_regularizer(config.regularizer, config.regularizer_params)]
        if config.strategy == "btuning":
            self.pieces.append(BTuningLoss(teacher, config.tradeoff))
        train_labels = torch.as_tensor(targets.fit, dtype=torch.long if task == "classification" else torch.float32)
        info = SetupInfo(task=task, train_labels=train_labels, total_steps=self.total_steps,
                         steps_per_epoch=self.steps_per_epoch)
        for piece in self.pieces:
            piece.setup(self.model, info)
        self.want_hidden = any(p.needs_hidden_states for p in self.pieces)
        self.use_bf16 = bool(config.bf16 and device.type == "cuda") and not any(p.needs_fp32 for p in self.pieces)
        self.optimizer = _optimizer(self.model, config)
        self.scheduler = _scheduler(self.optimizer, int(config.warmup_ratio * self.total_steps), self.total_steps)
        self.step = self.resumed_from = 0
        self.curve: list[dict[str, Any]] = []
        self.interval = [0.0, 0.0, 0]  # task loss sum, total loss sum, steps since the last curve point
        self.elapsed_before = 0.0
        self.last_eval: dict[str, float | None] | None = None
        self.last_outputs: np.ndarray | None = None  # of the last evaluation, for the diagnostics
        self.eval_batch = max(1, 2 * config.batch_size)
        self._order: Tensor | None = None
        self._order_epoch = -1

    def autocast(self) -> Any:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16) if self.use_bf16 else nullcontext()

    def wall_seconds(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.began

    def resume(self, state_path: Path, model_dir: Path) -> None:
        """Continue from `state_path` when it holds this run's state (same fingerprint and version)."""
        state = load_state(state_path, map_location=self.device) if state_path.exists() else None
        if state is None:
            return
        if state.get("fingerprint") != self.fingerprint or state.get("version") != STATE_VERSION:
            log.warning("ignoring a training state in %s written for a different run", state_path.parent)
            return
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for piece, piece_state in zip(self.pieces, state["pieces"], strict=True):
            piece.load_state_dict(piece_state)
        torch.set_rng_state(state["rng_cpu"].cpu())
        if self.device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)
        self.step = self.resumed_from = int(state["step"])
        self.curve = list(state["curve"])
        self.interval = list(state["interval"])
        self.elapsed_before = float(state["wall_seconds"])
        log.info("resuming %s from step %d of %d", model_dir, self.step, self.total_steps)

    def save_state(self, state_path: Path) -> None:
        device = self.device
        save_state_atomic({
            "version": STATE_VERSION, "fingerprint": self.fingerprint, "step": self.step,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "pieces": [p.state_dict() for p in self.pieces],
            "rng_cpu": torch.get_rng_state(), "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda"
            else None, "curve": self.curve, "interval": self.interval, "wall_seconds": self.wall_seconds(),
        }, state_path)

    def run(self, on_progress: Callable[[dict], None] | None, should_cancel: Callable[[], bool] | None,
            state_path: Path | None) -> None:
        """Train to the last step: cancel checks before each step, progress after, state saved as configured."""
        every = self.config.save_every_steps
        while self.step < self.total_steps:
            if should_cancel is not None and should_cancel():
                raise TuningCancelled(self.step)
            self.train_step()
            progress = self.progress_point()
            if on_progress is not None:
                on_progress(progress)
            if state_path is not None and every > 0 and self.step % every == 0 and self.step < self.total_steps:
                self.save_state(state_path)
        if self.last_eval is None:  # resumed exactly at the end: evaluate the restored weights
            self.last_eval = self.evaluate()

    def train_step(self) -> None:
        """One optimizer step on the next batch of the epoch's order, the pieces' hooks in their order."""
        epoch, pos = divmod(self.step, self.steps_per_epoch)
        if epoch != self._order_epoch:
            self._order, self._order_epoch = epoch_order(self.config.seed, epoch, len(self.train_data)), epoch
            if isinstance(self.train_data, AugmentedTexts):
                self.train_data.set_epoch(epoch)
        size = self.config.batch_size
        batch = self.train_data.batch(self._order[pos * size:(pos + 1) * size], self.device, self.task)
        self.model.train()
        ctx = StepContext(self.model, batch, self.task, step=self.step, total_steps=self.total_steps,
                          steps_per_epoch=self.steps_per_epoch, want_hidden=self.want_hidden)
        with self.autocast():
            task_loss, loss = self.losses(ctx)
        loss.backward()
        for piece in self.pieces:
            piece.after_backward(self.model, loss, lambda: self.regrad(ctx))
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        for piece in self.pieces:
            piece.after_step(self.model)
        self.step += 1
        self.interval[0] += float(task_loss.detach())
        self.interval[1] += float(loss.detach())
        self.interval[2] += 1

    def regrad(self, ctx: StepContext) -> Tensor:
        """The step's total loss at the model's current weights, its gradients replacing those there (SAM): the
        same batch, and the random state of the step's first pass (the same dropout masks and noise), after which
        the generator is put back."""
        saved = get_rng_state(self.device)
        set_rng_state(ctx.rng_state, self.device)
        try:
            self.model.zero_grad(set_to_none=True)
            again = StepContext(self.model, ctx.batch, self.task, step=ctx.step, total_steps=self.total_steps,
                                steps_per_epoch=self.steps_per_epoch, want_hidden=self.want_hidden)
            with self.autocast():
                _, loss = self.losses(again)
            loss.backward()
        finally:
            set_rng_state(saved, self.device)
        return loss.detach()

    def losses(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """(task loss, total loss) of one batch: a piece's own forward, or the clean forward with the pieces'
        labels and example weights; then every piece's extra terms."""
        override = None
        for piece in self.pieces:
            override = piece.forward_loss(ctx)
            if override is not None:
                break
        if override is not None:
            task_loss = override[1]
        else:
            logits, _ = ctx.clean_forward()
            labels = ctx.batch["labels"]
            for piece in self.pieces:
                labels = piece.relabel(ctx, labels)
            losses = per_example_loss(logits, labels, self.task)
            weights = None
            for piece in self.pieces:
                weights = piece.example_weights(ctx, losses)
                if weights is not None:
                    break
            task_loss = losses.mean() if weights is None else (weights * losses).sum()
        loss = task_loss
        for piece in self.pieces:
            extra = piece.extra_loss(ctx)
            if extra is not None:
                loss = loss + extra
        return task_loss, loss

    def progress_point(self) -> dict[str, Any]:
        """What on_progress gets after a step; at the end of an epoch (and every eval_every_steps) the validation
        set is evaluated and a point added to the curve."""
        step, per_epoch, interval = self.step, self.steps_per_epoch, self.interval
        every = self.config.eval_every_steps
        progress: dict[str, Any] = {"step": step, "total_steps": self.total_steps, "epoch": step / per_epoch,
                                    "train_loss": interval[0] / max(1, interval[2])}
        if step % per_epoch == 0 or (every > 0 and step % every == 0):
            self.last_eval = self.evaluate()
            point = {"step": step, "epoch": step / per_epoch, "train_loss": interval[0] / max(1, interval[2]),
                     "train_total_loss": interval[1] / max(1, interval[2]),
                     "val_loss": self.last_eval.get("val_loss")}
            main = MAIN_METRIC[self.task]
            if main in self.last_eval:
                point[f"val_{main}"] = self.last_eval[main]
            self.curve.append(point)
            self.interval = [0.0, 0.0, 0]
            progress["val_loss"] = self.last_eval.get("val_loss")
        return progress

    def evaluate(self) -> dict[str, float | None]:
        """Validation metrics; with an SNGP head, the last evaluation first fits its covariance on the training
        rows (earlier points of the curve read its MAP logits)."""
        if self.sngp and self.step >= self.total_steps:
            from workers.tuning.sngp import fit_precision

            self.precision_rows = fit_precision(self.model, self.train_data, self.device, self.eval_batch, self.task,
                                                self.autocast)
        metrics, self.last_outputs = _evaluate(self.model, self.val_data, self.task, self.device, self.eval_batch,
                                               self.autocast, self.scale)
        return metrics

    def finish(self, fold_scale: bool, max_length: int | None) -> dict[str, Any]:
        """Undo the pieces' wrappers and, for a checkpoint, fold the target scale into the head; the run's
        details (device, bf16, max_length, target_scaling, labels_changed, btuning)."""
        for piece in self.pieces:
            piece.teardown(self.model)
        details: dict[str, Any] = {"device": str(self.device), "bf16": self.use_bf16}
        if self.last_outputs is not None:  # the confusion matrix, reliability or predicted-vs-true of the end
            details["diagnostics"] = evaluation_diagnostics(self.task, self.last_outputs, self.val_data.labels)
        if max_length is not None:
            details["max_length"] = max_length  # config.max_length capped by the model's positions
        if self.scale is not None and fold_scale:  # the checkpoint predicts y itself (see target_scale)
            probe_data = self.val_data if len(self.val_data) else self.train_data
            probe = probe_data.batch(torch.arange(min(len(probe_data), self.eval_batch)), self.device, self.task)
            details["target_scaling"] = fold_into_head(self.model, self.scale, model_inputs(probe))
        for piece in self.pieces:
            if piece.name == "self_labeling":
                details["labels_changed"] = getattr(piece, "changed", 0)
            if piece.name == "btuning":
                details["btuning"] = piece.teacher.describe()
            if piece.name == "sam":
                details["sam"] = piece.describe()
        if self.sngp:
            from workers.tuning.sngp import spectral_norms

            details["sngp"] = {"precision_rows": self.precision_rows, "spectral_norms": {
                name: round(value, 6) for name, value in spectral_norms(self.model).items()}}
        return details

    def ood_score(self, ood: Batches | None) -> float | None:
        """AUROC of the uncertainty 1 - max probability, out-of-distribution rows against the validation rows."""
        if ood is None or len(ood) == 0 or self.last_outputs is None:
            return None
        outputs = _predict(self.model, ood, self.task, self.device, self.eval_batch, self.autocast)
        return ood_auroc(self.last_outputs, outputs)


def train(config: TuneConfig, model_dir: Path, train: ExampleDataset, val: ExampleDataset, task: str,
          label_names: list[str] | None, checkpoint_dir: Path | None, state_dir: Path | None,
          on_progress: Callable[[dict], None] | None = None, should_cancel: Callable[[], bool] | None = None,
          teacher: BTuningTeacher | None = None, *, card: dict[str, Any] | None = None,
          ood: list[Any] | None = None) -> TuneResult:
    """Tune the model in `model_dir` (a Hugging Face folder) on `train`, evaluate on `val`, and write a checkpoint
    folder to `checkpoint_dir` (see the module docstring for determinism, cancel and resume).

    label_names: class (or label) names for id2label/label2id; None gives "LABEL_i" (regression: ignored).
    teacher: required when config.strategy == "btuning" (rows in the order of `train`).
    checkpoint_dir, state_dir: None for a trial run that only reports its validation metrics (choosing B-Tuning's
        tradeoff): nothing is written, and it neither resumes nor can be resumed.
    card: extra fields for the model card, e.g. {"base_model", "base_revision", "dataset_sha256", "name"};
        strategy, regularizer, hyper-parameters, seed and scores are added here.
    ood: out-of-distribution examples (texts or encoded images, as `train`'s): the metrics add ood_auroc
        (evaluation.ood_auroc of 1 - max probability against the validation rows).
    """
    began = time.perf_counter()
    config = TuneConfig.from_dict(config if isinstance(config, dict) else asdict(config))  # a validated copy
    if task not in TASKS:
        raise ValueError(f"task: must be one of {list(TASKS)}, got {task!r}")
    model_dir = Path(model_dir)
    trial = checkpoint_dir is None or state_dir is None  # a trial run: nothing read or written
    train, val = ExampleDataset(*train), ExampleDataset(*val)
    if config.strategy == "btuning" and teacher is None:
        raise ValueError("teacher: B-Tuning needs the teachers' features and LogME weights (BTuningTeacher)")
    targets = _targets(task, train, val, label_names)
    fingerprint = _fingerprint(config, model_dir, train, val, task, label_names, teacher)
    if ood:  # the result reports on these rows too
        fingerprint = hashlib.sha256((fingerprint + json.dumps(
            [e if isinstance(e, (str, list, tuple)) else hashlib.sha256(e).hexdigest() for e in ood])).encode()
        ).hexdigest()
    if not trial:
        checkpoint_dir, state_dir = Path(checkpoint_dir), Path(state_dir)
        result_path = state_dir / RESULT_FILE
        if result_path.exists() and checkpoint_dir.exists():
            done = json.loads(result_path.read_text(encoding="utf-8"))
            if done.get("fingerprint") == fingerprint:
                return TuneResult.from_dict(done["result"])
        discard_partial(checkpoint_dir)

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = _load_model(config, model_dir, train, val, task, targets, device)
    trainer = _Trainer(config, loaded, task, targets, device, teacher, fingerprint, began)
    state_path = None if trial else state_dir / STATE_FILE
    if state_path is not None:
        trainer.resume(state_path, model_dir)
    trainer.run(on_progress, should_cancel, state_path)
    details = trainer.finish(fold_scale=not trial, max_length=loaded.max_length)
    if loaded.adapter is not None:
        details["peft"] = loaded.adapter
    metrics = {**trainer.last_eval, **parameter_counts(loaded.model)}
    ood_batches = _ood_batches(loaded, ood)
    if ood_batches is not None:
        metrics["ood_auroc"] = trainer.ood_score(ood_batches)
        details["ood_rows"] = len(ood_batches)
    result = TuneResult(task=task, metrics=metrics, curve=trainer.curve, wall_seconds=trainer.wall_seconds(),
                        steps=trainer.step, total_steps=trainer.total_steps, resumed_from_step=trainer.resumed_from,
                        checkpoint_dir="" if trial else str(checkpoint_dir), config=config.to_dict(), details=details)
    if trial:
        return result
    _save_run(result, loaded, targets.names, config, card, checkpoint_dir, state_dir, fingerprint, model_dir)
    return result


def _save_run(result: TuneResult, loaded: _Loaded, names: list[str], config: TuneConfig,
              card: dict[str, Any] | None, checkpoint_dir: Path, state_dir: Path, fingerprint: str,
              model_dir: Path) -> None:
    """Write the checkpoint with its model card, then the result (so a re-run returns it), then drop the state."""
    details, task = result.details, result.task
    record = dict(card or {})
    record.update({
        "task": task, "modality": loaded.modality,
        "label_names": names if task != "regression" else None, "strategy": config.strategy,
        "regularizer": {"name": config.regularizer, "params": config.resolved_regularizer_params()},
        "hyperparameters": result.config, "seed": config.seed, "scores": result.metrics, "steps": result.steps,
        "wall_seconds": round(result.wall_seconds, 3), "device": details["device"], "bf16": details["bf16"],
        **({"btuning": details["btuning"]} if "btuning" in details else {}),
        **({"sam": details["sam"]} if "sam" in details else {}),
        **({"peft": details["peft"]} if "peft" in details else {}),
        **({"sngp": {**loaded.sngp, **details["sngp"]}} if loaded.sngp is not None else {}),
        **({"softdecay": config.softdecay} if config.softdecay is not None else {}),
        **({"target_scaling": details["target_scaling"]} if "target_scaling" in details else {}),
    })
    loaded.model.eval()
    save = None
    if loaded.peft is not None:
        from workers.tuning.adapters import save_adapter, write_base_view

        base = write_base_view(loaded.model, model_dir, checkpoint_dir.with_name(checkpoint_dir.name + ".base"))
        record["adapter_base"] = str(base)

        def save(folder: Path) -> None:
            save_adapter(loaded.peft, loaded.model, loaded.preprocessor, folder, base, bool(config.peft["merge"]))
            if loaded.sngp is not None:  # the adapter folder's head is peft's trained copy of the SNGP head
                from workers.tuning.sngp import write_sngp_config

                write_sngp_config(folder, loaded.sngp, loaded.modality)
                if config.peft["merge"]:
                    write_sngp_config(folder / "merged", loaded.sngp, loaded.modality)
    elif loaded.sngp is not None:
        from workers.tuning.sngp import write_sngp_config

        def save(folder: Path) -> None:
            loaded.model.save_pretrained(folder, safe_serialization=True)
            write_sngp_config(folder, loaded.sngp, loaded.modality)
    if config.softdecay is not None:
        save = _with_softdecay(save, loaded, config)
    with _quiet_transformers():
        write_checkpoint(loaded.model, loaded.preprocessor, checkpoint_dir, record, save=save)
    write_json_atomic(state_dir / RESULT_FILE, {"fingerprint": fingerprint, "result": result.to_dict()})
    state_path = state_dir / STATE_FILE
    if state_path.exists():
        state_path.unlink()


def _with_softdecay(save: Callable[[Path], None] | None, loaded: _Loaded, config: TuneConfig
                    ) -> Callable[[Path], None]:
    """`save` (or save_pretrained) and softdecay.json beside the weights (and the merged folder's), which
    `workers.tuning.softdecay.install_softdecay` reads back."""
    from workers.tuning.softdecay import write_softdecay_config

    def save_with(folder: Path) -> None:
        if save is not None:
            save(folder)
        else:
            loaded.model.save_pretrained(folder, safe_serialization=True)
        write_softdecay_config(folder, config.softdecay)
        if config.peft is not None and config.peft["merge"]:
            write_softdecay_config(folder / "merged", config.softdecay)

    return save_with

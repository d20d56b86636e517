"""Choosing by validation: the train/validation split of a tune job, and B-Tuning's tradeoff picked from a grid.

B-Tuning's tradeoff (the weight of the distillation term) is data-dependent: the official scripts use values from
0.001 to 1000, and on our own runs the best value differed by data (BBC News, MiniLM-L6, 96 texts: 0.01 kept plain
fine-tuning's accuracy and 1 lost 0.13; Fashion-MNIST, MobileNetV2, 800 images: 1 matched fine-tuning). So unless a
job fixes it, each value of a grid trains the target once on 80% of the training split with the job's own settings,
is scored by its task loss on the other 20%, and the best is used for the real run on the whole training split
("auto" tries larger values while the largest tried wins: TRADEOFF_CEILING). The job's validation split is never
seen while choosing, so its reported metrics stay honest; the teachers' LogME read-outs used for the trials are fitted
on the trials' 80% only, or they would carry the held-out labels into the distillation target.

Importing this module is torch-free (the tune phase imports split_rows; the rows are drawn by workers.sampling); the
trials load the training loop on use.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from workers.pipeline import UnscorableTargets
from workers.sampling import stratified_split
from workers.tuning.checkpoint import write_json_atomic

# The default grid (tradeoff "auto"): one value per decade from nearly plain fine-tuning up to 10. The reference's 100
# on a mean over N x C is 100/C on our per-example sum over C (1 for 100 classes, 50 for 2); four values keep a job
# with "auto" at about 4x the cost of one run.
TRADEOFF_GRID = (0.01, 0.1, 1.0, 10.0)
# "auto" goes on upwards, a decade at a time, while the largest value tried is the best, up to the top of the
# published range (the official scripts use 0.001 to 1000): on Fashion-MNIST the held-out loss fell all the way to
# 10 in every seed. Not downwards: below 0.01 B-Tuning is plain fine-tuning, which the grid's bottom already nears.
TRADEOFF_CEILING = 1000.0
# Used when no trial can run (one example per class, or no teacher on the trials' rows): the earlier default.
FALLBACK_TRADEOFF = 1.0
TRIAL_VALIDATION_FRACTION = 0.2
SELECTION_FILE = "tradeoff.json"

# Trials are judged by their held-out task loss (cross-entropy, binary cross-entropy, squared error), and ties by
# the task's main metric (whether higher is better). Not by accuracy first: a few dozen held-out rows give accuracies
# in steps of several percent, and on BBC News (18 held-out texts per trial, 3 seeds) accuracy picked 10 once by 3
# rows where the loss ranked the four values in the same order in every seed.
SELECTION_METRIC = {"classification": ("accuracy", True), "multilabel": ("micro_f1", True),
                    "regression": ("rmse", False)}


def split_rows(labels: np.ndarray, task: str, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation row indices (sorted): `validation_fraction` of the rows (at least one) held out, stratified
    by class for classification so that every class with two or more rows is validated and every class trained."""
    size = max(1, int(round(len(labels) * validation_fraction)))
    val_idx, train_idx = stratified_split(labels, size, seed, stratify=task == "classification", minimum=1, keep=1)
    return train_idx, val_idx


def tradeoff_grid(value: Any) -> list[float] | None:
    """The values to choose among for a job's `tradeoff` setting: "auto" -> TRADEOFF_GRID, a list -> its distinct
    values in order, a number -> None (fixed, nothing to choose)."""
    if value == "auto":
        return list(TRADEOFF_GRID)
    if isinstance(value, (list, tuple)):
        return sorted({float(v) for v in value})
    return None


def best_trial(trials: Sequence[dict[str, Any]], task: str) -> dict[str, Any]:
    """The trial with the lowest held-out loss, ties to the better main metric (SELECTION_METRIC), then to the
    smaller tradeoff (the one closer to plain fine-tuning). A missing or non-finite value loses."""
    metric, higher = SELECTION_METRIC[task]

    def key(trial: dict[str, Any]) -> tuple[float, float, float]:
        value = trial.get(metric)
        loss = trial.get("val_loss")
        value = float(value) if value is not None and math.isfinite(value) else -math.inf if higher else math.inf
        loss = float(loss) if loss is not None and math.isfinite(loss) else math.inf
        return (loss, -value if higher else value, float(trial["tradeoff"]))

    return min(trials, key=key)


def extension_steps(grid: Sequence[float], extend_to: float | None) -> int:
    """How many values `choose_tradeoff` may add above the grid (one per decade up to extend_to)."""
    if extend_to is None or not grid:
        return 0
    steps, top = 0, max(grid)
    while top * 10 <= extend_to * (1 + 1e-9):
        steps, top = steps + 1, top * 10
    return steps


def choose_tradeoff(config: Any, model_dir: Path, train_set: Any, task: str, label_names: list[str] | None,
                    make_teacher: Callable[[np.ndarray], Any], grid: Sequence[float], work_dir: Path,
                    on_progress: Callable[[int, float, dict[str, Any]], None] | None = None,
                    extend_to: float | None = None) -> dict[str, Any]:
    """Pick B-Tuning's tradeoff from `grid` by held-out performance on the training split (see the module docstring).

    config: the job's TuneConfig (strategy "btuning"); each trial runs it with another tradeoff, nothing saved.
    make_teacher(rows): the BTuningTeacher fitted on those rows of `train_set` only (features in that row order).
    work_dir: each finished trial, then the choice, is kept in work_dir/tradeoff.json and read back for the same grid
        and settings, so a worker that dies while choosing trains only the trials it had not finished.
    on_progress(trial_index, tradeoff, point): the training loop's progress points of each trial (a cancel raises
    there).
    extend_to: while the largest value tried is the best, try ten times it, up to extend_to ("auto": TRADEOFF_CEILING);
    None: the grid only (a list a job gave).
    Returns {"chosen", "grid", "extended" (values added above the grid), "criterion", "metric", "trials":
    [{tradeoff, <metric>, val_loss, steps, wall_seconds}], "rows": {train, validation}}; or, when no row can be held
    out or the trials' rows give no teacher (multi-label rows without a label, a constant target), FALLBACK_TRADEOFF
    with a "reason"."""
    grid = sorted({float(v) for v in grid})
    key = {"grid": grid, "extend_to": extend_to,
           "config": {k: v for k, v in config.to_dict().items() if k not in ("tradeoff", "device")}}
    key = json.loads(json.dumps(key))  # as read back from the file (tuples become lists)
    record_path = Path(work_dir) / SELECTION_FILE
    stored, done = _read_record(record_path, key)
    if stored is not None:
        return stored

    labels = np.asarray(train_set.labels)
    fit_rows, held_rows = split_rows(labels, task, TRIAL_VALIDATION_FRACTION, config.seed)
    metric = SELECTION_METRIC[task][0]
    teacher, reason = _trial_teacher(grid, fit_rows, held_rows, make_teacher)
    if reason is not None:
        chosen = grid[0] if len(grid) == 1 else FALLBACK_TRADEOFF
        selection: dict[str, Any] = {"chosen": chosen, "grid": grid, "extended": [], "criterion": "val_loss",
                                     "metric": metric, "trials": [], "reason": reason}
    else:
        trials = _Trials(config, model_dir, train_set, fit_rows, held_rows, task, label_names, teacher, metric,
                         done, on_progress, lambda tried: write_json_atomic(
                             record_path, {"key": key, "trials": tried, "selection": None}))
        extended = trials.run(grid, extension_steps(grid, extend_to))
        selection = {"chosen": best_trial(trials.done, task)["tradeoff"], "grid": grid, "extended": extended,
                     "criterion": "val_loss", "metric": metric, "trials": trials.done,
                     "rows": {"train": int(len(fit_rows)), "validation": int(len(held_rows))}}
    write_json_atomic(record_path, {"key": key, "selection": selection})
    return selection


def _read_record(record_path: Path, key: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[float, dict[str, Any]]]:
    """What an earlier attempt with the same key left: (its selection, or None; its finished trials by tradeoff)."""
    if not record_path.is_file():
        return None, {}
    stored = json.loads(record_path.read_text(encoding="utf-8"))
    if stored.get("key") != key:
        return None, {}
    if stored.get("selection") is not None:
        return stored["selection"], {}
    return None, {float(t["tradeoff"]): t for t in stored.get("trials", [])}


def _trial_teacher(grid: Sequence[float], fit_rows: np.ndarray, held_rows: np.ndarray,
                   make_teacher: Callable[[np.ndarray], Any]) -> tuple[Any, str | None]:
    """(the teacher fitted on the trials' rows, None), or (None, why no trial can run)."""
    if len(grid) == 1:
        return None, "one value given"
    if len(held_rows) == 0 or len(fit_rows) == 0:
        return None, "the training split is too small to hold rows out"
    try:
        return make_teacher(fit_rows), None
    except UnscorableTargets as exc:
        # e.g. a multi-label set whose few positive rows all fell in the held-out part: no teacher to trial
        return None, f"no teacher can be fitted on the trials' {len(fit_rows)} rows: {exc}"


class _Trials:
    """The trial runs of one choice: each trains on the fit rows and is scored on the held-out rows, nothing saved;
    `record(trials)` after each, so a restarted worker finds the finished ones (`done` at the start)."""

    def __init__(self, config: Any, model_dir: Path, train_set: Any, fit_rows: np.ndarray, held_rows: np.ndarray,
                 task: str, label_names: list[str] | None, teacher: Any, metric: str,
                 finished: dict[float, dict[str, Any]],
                 on_progress: Callable[[int, float, dict[str, Any]], None] | None,
                 record: Callable[[list[dict[str, Any]]], None]) -> None:
        from workers.tuning.data import ExampleDataset

        labels = np.asarray(train_set.labels)
        self.fit, self.held = (ExampleDataset([train_set.examples[i] for i in rows], labels[rows])
                               for rows in (fit_rows, held_rows))
        self.config, self.model_dir, self.task, self.label_names = config, model_dir, task, label_names
        self.teacher, self.metric, self.finished = teacher, metric, finished
        self.on_progress, self.record = on_progress, record
        self.done: list[dict[str, Any]] = []

    def run(self, grid: Sequence[float], extensions: int) -> list[float]:
        """Every value of the grid, then up to `extensions` values ten times the largest while it is the best;
        returns the values added above the grid."""
        for value in grid:
            self.trial(value)
        extended: list[float] = []
        for _ in range(extensions):
            top = max(t["tradeoff"] for t in self.done)
            if best_trial(self.done, self.task)["tradeoff"] != top:
                break
            extended.append(float(top * 10))
            self.trial(extended[-1])
        return extended

    def trial(self, value: float) -> None:
        from workers.tuning import loop  # looked up on each call: tests replace loop.train

        index = len(self.done)
        if value in self.finished:  # finished before a restart
            self.done.append(self.finished[value])
            return
        on_progress = self.on_progress
        progress = None if on_progress is None else (lambda point: on_progress(index, value, point))
        result = loop.train(replace(self.config, tradeoff=value, save_every_steps=0), self.model_dir, self.fit,
                            self.held, self.task, self.label_names, checkpoint_dir=None, state_dir=None,
                            on_progress=progress, teacher=self.teacher)
        self.done.append({"tradeoff": value, self.metric: result.metrics.get(self.metric),
                          "val_loss": result.metrics.get("val_loss"), "steps": result.steps,
                          "wall_seconds": round(result.wall_seconds, 3)})
        self.record(self.done)

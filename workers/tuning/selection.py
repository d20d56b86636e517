"""Choosing by validation: the train/validation split of a tune job, and B-Tuning's tradeoff picked from a grid.

B-Tuning's tradeoff (the weight of the distillation term) is data-dependent: the official scripts use values from
0.001 to 1000, and on our own runs the best value differed by data (BBC News, MiniLM-L6, 96 texts: 0.01 kept plain
fine-tuning's accuracy and 1 lost 0.13; Fashion-MNIST, MobileNetV2, 800 images: 1 matched fine-tuning). So unless a
job fixes it, each value of a grid trains the target once on 80% of the training split with the job's own settings,
is scored by its task loss on the other 20%, and the best is used for the real run on the whole training split
("auto" tries larger values while the largest tried wins: TRADEOFF_CEILING). The job's validation split is never seen while choosing, so its reported metrics stay honest; the teachers' LogME
read-outs used for the trials are fitted on the trials' 80% only, or they would carry the held-out labels into the
distillation target.

Importing this module is torch-free (the runner imports split_rows); the trials load the training loop on use.
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
    """Train/validation row indices; stratified by class for classification so every class is validated."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    if task == "classification":
        val: list[int] = []
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            take = int(round(len(members) * validation_fraction))
            if len(members) > 1:
                take = min(max(take, 1), len(members) - 1)
            val.extend(members[:take].tolist())
        val_idx = np.sort(np.asarray(val, dtype=np.int64))
    else:
        val_idx = np.sort(rng.permutation(n)[: max(1, int(round(n * validation_fraction)))])
    train_idx = np.setdiff1d(np.arange(n), val_idx)
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
    from workers.tuning.loop import TextDataset, train

    grid = sorted({float(v) for v in grid})
    key = {"grid": grid, "extend_to": extend_to,
           "config": {k: v for k, v in config.to_dict().items() if k not in ("tradeoff", "device")}}
    key = json.loads(json.dumps(key))  # as read back from the file (tuples become lists)
    record_path = Path(work_dir) / SELECTION_FILE
    done: dict[float, dict[str, Any]] = {}
    if record_path.is_file():
        stored = json.loads(record_path.read_text(encoding="utf-8"))
        if stored.get("key") == key:
            if stored.get("selection") is not None:
                return stored["selection"]
            done = {float(t["tradeoff"]): t for t in stored.get("trials", [])}

    labels = np.asarray(train_set.labels)
    fit_rows, held_rows = split_rows(labels, task, TRIAL_VALIDATION_FRACTION, config.seed)
    metric = SELECTION_METRIC[task][0]
    reason = None
    if len(grid) == 1:
        reason = "one value given"
    elif len(held_rows) == 0 or len(fit_rows) == 0:
        reason = "the training split is too small to hold rows out"
    else:
        try:
            teacher = make_teacher(fit_rows)
        except UnscorableTargets as exc:
            # e.g. a multi-label set whose few positive rows all fell in the held-out part: no teacher to trial
            reason = f"no teacher can be fitted on the trials' {len(fit_rows)} rows: {exc}"
    if reason is not None:
        chosen = grid[0] if len(grid) == 1 else FALLBACK_TRADEOFF
        selection: dict[str, Any] = {"chosen": chosen, "grid": grid, "extended": [], "criterion": "val_loss",
                                     "metric": metric, "trials": [], "reason": reason}
    else:
        def subset(rows: np.ndarray) -> Any:
            return TextDataset([train_set.texts[i] for i in rows], labels[rows])

        trials: list[dict[str, Any]] = []

        def run_trial(value: float) -> None:
            index = len(trials)
            if value in done:  # finished before a restart
                trials.append(done[value])
                return
            trial_config = replace(config, tradeoff=value, save_every_steps=0)
            progress = None if on_progress is None else (lambda point: on_progress(index, value, point))
            result = train(trial_config, model_dir, subset(fit_rows), subset(held_rows), task, label_names,
                           checkpoint_dir=None, state_dir=None, on_progress=progress, teacher=teacher)
            trials.append({"tradeoff": value, metric: result.metrics.get(metric),
                           "val_loss": result.metrics.get("val_loss"), "steps": result.steps,
                           "wall_seconds": round(result.wall_seconds, 3)})
            write_json_atomic(record_path, {"key": key, "trials": trials, "selection": None})

        for value in grid:
            run_trial(value)
        extended: list[float] = []
        for _ in range(extension_steps(grid, extend_to)):
            top = max(t["tradeoff"] for t in trials)
            if best_trial(trials, task)["tradeoff"] != top:
                break
            extended.append(float(top * 10))
            run_trial(extended[-1])
        selection = {"chosen": best_trial(trials, task)["tradeoff"], "grid": grid, "extended": extended,
                     "criterion": "val_loss", "metric": metric,
                     "trials": trials, "rows": {"train": int(len(fit_rows)), "validation": int(len(held_rows))}}
    write_json_atomic(record_path, {"key": key, "selection": selection})
    return selection

"""Tuning: one training loop, regularizers as composable pieces, B-Tuning, atomic checkpoints.

    data.py         ExampleDataset (texts, text pairs or image files, with labels), label checks; numpy only
    batches.py      tokenised / decoded batches and each epoch's seeded order
    loop.py         train(): set up, resume, one step at a time, evaluate, save the checkpoint
    regularizers/   the pieces a step calls (base protocol; weight_space, adversarial, noise families)
    btuning.py      B-Tuning's teacher and distillation loss
    selection.py    the train/validation split and B-Tuning's tradeoff chosen by trial runs
    evaluation.py   held-out accuracy, F1, calibration, RMSE of a tuned model
    checkpoint.py   checkpoints, model cards and resume state, written atomically
    target_scale.py regression targets standardised, and the scale folded into the head

Importing this package is cheap and torch-free (the API validates settings with `TuneConfig` and lists the
regularizers with `REGULARIZER_PARAMS`); the torch-side names load on first use.
"""

from __future__ import annotations

from typing import Any

from service.contract.tuning import REGULARIZER_PARAMS, TuneConfig, describe_regularizers, resolve_regularizer

_LAZY = {
    "train": "workers.tuning.loop",
    "ExampleDataset": "workers.tuning.data",
    "TuneResult": "workers.tuning.loop",
    "TuningCancelled": "workers.tuning.loop",
    "BTuningTeacher": "workers.tuning.btuning",
    "build_regularizer": "workers.tuning.regularizers",
    "write_checkpoint": "workers.tuning.checkpoint",
    "list_files": "workers.tuning.checkpoint",
}

__all__ = ["REGULARIZER_PARAMS", "TuneConfig", "describe_regularizers", "resolve_regularizer", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)

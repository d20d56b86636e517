"""Tuning: one training loop, regularizers as composable pieces, B-Tuning, atomic checkpoints.

Importing this package is cheap and torch-free (the API validates settings with `TuneConfig` and lists the
regularizers with `REGULARIZER_PARAMS`); the torch-side names load on first use.
"""

from __future__ import annotations

from typing import Any

from service.contract.tuning import REGULARIZER_PARAMS, TuneConfig, describe_regularizers, resolve_regularizer

_LAZY = {
    "train": "workers.tuning.loop",
    "TextDataset": "workers.tuning.loop",
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

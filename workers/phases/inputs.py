"""What a phase reads: plain dataclasses the runner builds from the database rows and the worker settings.

Torch-free and database-free: a phase can be called from a notebook or a test with values built by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.settings import Settings
from workers.pipeline import DatasetSpec, ModelSpec


def feature_batch_size(settings: Settings) -> int:
    """Examples per forward pass when extracting features: larger on a GPU, where small batches leave it idle."""
    from workers.features import pick_device

    on_gpu = pick_device(settings.device).startswith("cuda")
    return settings.feature_batch_size_gpu if on_gpu else settings.feature_batch_size


@dataclass(frozen=True)
class FeatureSettings:
    """Where and how features are extracted, from the worker's settings."""

    cache_root: Path  # the feature cache
    hf_cache_dir: Path
    max_length: int
    batch_size: int
    device: str | None

    @classmethod
    def from_settings(cls, settings: Settings) -> FeatureSettings:
        return cls(cache_root=settings.features_dir, hf_cache_dir=settings.hf_cache_dir,
                   max_length=settings.feature_max_length, batch_size=feature_batch_size(settings),
                   device=settings.device)


@dataclass(frozen=True)
class RankInput:
    """A rank phase: the dataset, the candidates in the job's order, the estimators (the first ranks), and the
    job's options (seed, pooling, sample_size, successive_halving)."""

    dataset: DatasetSpec
    models: list[ModelSpec]
    metrics: list[str]
    options: dict[str, Any]
    features: FeatureSettings
    bootstrap_samples: int


@dataclass(frozen=True)
class RankedCandidate:
    """One entry of a finished ranking: the model, its scores, and the error that kept it from being scored."""

    model: ModelSpec
    scores: dict[str, Any]
    error: str | None = None


@dataclass(frozen=True)
class TuneDataset:
    """The dataset as the tune phase and the checkpoints' model cards describe it."""

    spec: DatasetSpec
    sha256: str
    columns: dict[str, str]  # the columns the checkpoint reads: text, text_pair or image, and label


@dataclass(frozen=True)
class TuneInput:
    """A tune phase: the job's tuning spec (service.contract.TuneSpec as stored), its ranking best first, where
    its checkpoints, results and training states go (job_dir), and the dataset `tune.ood_dataset_id` names."""

    job_id: str
    spec: dict[str, Any]
    pooling: str
    dataset: TuneDataset
    ranking: list[RankedCandidate]
    features: FeatureSettings
    job_dir: Path
    ood: DatasetSpec | None = None

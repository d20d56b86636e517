"""Request bodies and the names the API accepts. Torch-free: the worker-side registries are checked against
these names by tests (tests/unit/test_names.py), so the two cannot drift apart."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TASKS = ("classification", "multilabel", "regression")
METRICS = ("logme", "logme_projected", "ridge_loo", "hscore", "hscore_shrinkage", "nleep", "gbc", "transrate", "sfda", "leep", "nce")
# Which tasks each metric is defined for; the rest are classification-only estimators.
METRIC_TASKS: dict[str, tuple[str, ...]] = {"logme": TASKS, "logme_projected": TASKS, "ridge_loo": TASKS}
REGULARIZERS = ("none", "l2sp", "mixout", "smart", "r3f", "vat", "sift", "lnsr", "hype", "nfm", "self_labeling")


def metric_applies(metric: str, task: str) -> bool:
    return task in METRIC_TASKS.get(metric, ("classification",))


class ModelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Literal["hf", "local"]
    repo_id: str | None = Field(default=None, description="hf: the hub repository id, e.g. org/name")
    revision: str | None = Field(default=None, description="hf: a commit hash, tag or branch (default main)")
    path: str | None = Field(default=None, description="local: a folder the server can read")
    name: str | None = None

    def missing_locator(self) -> str | None:
        """The field a source needs and lacks, named in the 422."""
        if self.source == "hf" and not self.repo_id:
            return "repo_id"
        if self.source == "local" and not self.path:
            return "path"
        return None


class RegularizerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal[REGULARIZERS] = "none"  # type: ignore[valid-type]
    params: dict[str, Any] = Field(default_factory=dict)


# B-Tuning's tradeoff given as a list: each value costs one trial run
MAX_TRADEOFF_TRIALS = 8


class TuneSpec(BaseModel):
    """Tuning options; every default is documented in README.md (Tuning)."""

    model_config = ConfigDict(extra="forbid")
    strategy: Literal["finetune", "btuning"] = "finetune"
    top_k: int = Field(default=1, ge=1, le=20, description="finetune: tune the top-k; btuning: number of teachers")
    target: str | None = Field(default=None, description="model id to tune; default the top-ranked")
    regularizer: RegularizerSpec = Field(default_factory=RegularizerSpec)
    tradeoff: float | list[float] | Literal["auto"] = Field(
        default="auto", description="btuning: weight of the distillation term; \"auto\" (0.01, 0.1, 1, 10, then "
        "100 and 1000 while the largest tried wins) or a list of values picks it by the held-out loss of trial runs "
        "on the training split, one per value")
    temperature: float = Field(default=0.1, gt=0, description="btuning: teacher weights softmax(LogME/T)")
    epochs: int = Field(default=3, ge=1, le=100)
    lr: float = Field(default=2e-5, gt=0, le=1.0)
    batch_size: int = Field(default=16, ge=1, le=1024)
    max_length: int = Field(default=128, ge=8, le=8192)
    seed: int = 0
    validation_fraction: float = Field(default=0.2, gt=0, lt=0.9)

    @field_validator("tradeoff", mode="before")
    @classmethod
    def _tradeoff(cls, value: Any) -> Any:
        """One message for the three forms (pydantic's union would report a failure per form)."""
        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0

        if value == "auto" or number(value):
            return value
        if isinstance(value, list) and 1 <= len(value) <= MAX_TRADEOFF_TRIALS and all(number(v) for v in value):
            return value
        raise ValueError(f'expected a number >= 0, a list of 1 to {MAX_TRADEOFF_TRIALS} such numbers, or "auto"; '
                         f"got {value!r}")


class HalvingSpec(BaseModel):
    """Successive halving: score every candidate on a small stratified sample, drop the ones confidently behind
    the leader (paired bootstrap), grow the sample for the rest; nested samples reuse earlier features."""

    model_config = ConfigDict(extra="forbid")
    initial_rows: int = Field(default=256, ge=16)
    growth: float = Field(default=2.0, gt=1.0, le=16.0)
    confidence: float = Field(default=0.95, gt=0.5, le=1.0)
    min_models: int = Field(default=1, ge=1)


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset_id: str
    candidates: list[str] | None = Field(default=None, description="model ids; default all compatible models")
    metrics: list[str] = Field(default_factory=lambda: ["logme"], min_length=1)
    sample_size: int | None = Field(default=None, ge=10, description="rank on a stratified sample of this many rows")
    seed: int = 0
    pooling: Literal["mean", "head"] = Field(
        default="mean", description="features the estimators see: mean over tokens, or the token a "
        "sequence-classification head reads (the last for decoder-only models, the first for encoders)")
    successive_halving: HalvingSpec | None = Field(default=None, description="rank many candidates on growing samples")
    tune: TuneSpec | None = None

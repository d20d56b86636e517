"""The API's request bodies and response bodies. Torch-free; the names they accept come from service.contract.

Responses are documented as they are rendered: timestamps are the ISO 8601 strings of Python's isoformat(), in UTC
with their offset (+00:00) on both databases, fields that may be null are present as null, and a ranking entry
carries its estimator's details as extra keys. Request bodies are RequestModels: strings hold no NUL and no lone
surrogate, and fit the column that stores them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.contract import (
    DEFAULT_METRICS,
    ESTIMATORS,
    FEATURE_TRANSFORMS,
    LIMITS,
    MODALITIES,
    SOFTDECAY_ALPHA_RANGE,
    SOFTDECAY_RANK_ALPHA,
    TASKS,
    JobStatus,
    TuneSpec,
)
from service.contract.text import ID_LENGTH, RequestModel
from service.db import HubModel

__all__ = [
    "CheckpointFileOut", "CheckpointOut", "DatasetOut", "DependencyHealth", "HalvingSpec", "Health", "JobCreate",
    "JobOut", "ModelCreate", "ModelOut", "Page", "RankingEntryOut", "RegularizerParam", "TuneSpec",
]

ItemT = TypeVar("ItemT")

# The hub's own rules for a repository id (huggingface_hub.utils.validate_repo_id): [org/]name of letters, digits,
# "-", "_" and ".", at most 96 characters, no "--" or "..", "-" or "." neither first nor last, no ".git" ending.
HUB_REPO_ID_LENGTH = 96
_HUB_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_HUB_REPO_ID = re.compile(rf"(?:{_HUB_NAME}/)?{_HUB_NAME}")
PATH_LENGTH = 4096  # PATH_MAX on Linux
_NAME_LENGTH = 64  # an estimator's name (service.contract.ESTIMATORS)

# ---- requests -------------------------------------------------------------------------------------------------


class ModelCreate(RequestModel):
    source: Literal["hf", "local", "checkpoint"]
    repo_id: str | None = Field(default=None, max_length=HUB_REPO_ID_LENGTH,
                                description="hf: the hub repository id, e.g. org/name")
    revision: str | None = Field(default=None, max_length=HubModel.revision.type.length,
                                 description="hf: a commit hash, tag or branch (default main)")
    path: str | None = Field(default=None, max_length=PATH_LENGTH,
                             description="local (admins only): a folder below HUBTUNE_MODEL_ROOTS")
    job_id: str | None = Field(default=None, max_length=ID_LENGTH, description="checkpoint: the job that tuned it")
    name: str | None = Field(default=None, max_length=HubModel.name.type.length,
                             description="hf, local: the entry's name; checkpoint: the checkpoint's name")

    @field_validator("repo_id")
    @classmethod
    def _hub_repo_id(cls, value: str | None) -> str | None:
        """The hub refuses other ids when the worker downloads; refused here instead. Blank is a missing id."""
        if value is None or not value.strip():
            return None
        if not _HUB_REPO_ID.fullmatch(value) or "--" in value or ".." in value or value.endswith(".git"):
            raise ValueError("not a hub repository id: [org/]name of letters, digits, '-', '_' and '.' (no '--' "
                             "or '..', '-' and '.' neither first nor last, no '.git' ending)")
        return value

    def missing_locator(self) -> str | None:
        """The field a source needs and lacks, named in the 422."""
        if self.source == "hf" and not self.repo_id:
            return "repo_id"
        if self.source == "local" and not (self.path and self.path.strip()):
            return "path"
        if self.source == "checkpoint":
            return next((f for f in ("job_id", "name") if not (getattr(self, f) or "").strip()), None)
        return None


class HalvingSpec(RequestModel):
    """Successive halving: score every candidate on a small stratified sample, drop the ones confidently behind
    the leader (paired bootstrap), grow the sample for the rest; nested samples reuse earlier features."""

    initial_rows: int = Field(default=256, ge=16)
    growth: float = Field(default=2.0, gt=1.0, le=16.0)
    confidence: float = Field(default=0.95, gt=0.5, le=1.0)
    min_models: int = Field(default=1, ge=1)


class JobCreate(RequestModel):
    dataset_id: str = Field(max_length=ID_LENGTH)
    candidates: list[Annotated[str, Field(max_length=ID_LENGTH)]] | None = Field(
        default=None, description="model ids; default all compatible models")
    # the names are listed in the schema (the dashboard's form reads them) but checked by the route, whose 422
    # names the unknown metric and the known ones
    metrics: list[Annotated[str, Field(max_length=_NAME_LENGTH, json_schema_extra={"enum": list(ESTIMATORS)})]] = (
        Field(default_factory=lambda: list(DEFAULT_METRICS), min_length=1,
              json_schema_extra={"default": list(DEFAULT_METRICS)},
              description="the estimators; the first orders the ranking. Default: the combination the "
              "model-selection suite supports (service.contract.DEFAULT_METRICS); with successive_halving, its "
              "first"))
    sample_size: int | None = Field(default=None, ge=10, description="rank on a stratified sample of this many rows")
    seed: int = Field(default=0, ge=LIMITS["seed"][0], le=LIMITS["seed"][1])
    pooling: Literal["mean", "head"] = Field(
        default="mean", description="features the estimators see: mean over tokens, or the token a "
        "sequence-classification head reads (the last for decoder-only models, the first for encoders)")
    layers: Literal["last", "all"] | list[int] | None = Field(
        default=None, description="text models: which hidden states the estimators read, each pooled alike: "
        "\"last\", \"all\" (the mean over every layer's output), or a list of indices into the hidden states "
        "(0 the embedding output, -1 the last layer) averaged; every layer is cached from one forward pass. "
        "Default: \"last\" (service.contract.DEFAULT_LAYERS, chosen on the model-selection suite)")
    feature_transform: Literal[FEATURE_TRANSFORMS] = Field(  # type: ignore[valid-type]
        default="none", description="what the estimators' features go through first: \"none\", or \"softdecay\" "
        "(the singular value spectrum of the N x D features of the ranked rows flattened, token uniformity's "
        "SoftDecay; from cached features, no extra forward pass; docs/estimators.md)")
    softdecay_alpha: float | None = Field(
        default=None, gt=SOFTDECAY_ALPHA_RANGE[0], le=SOFTDECAY_ALPHA_RANGE[1],
        description=f"feature_transform softdecay: its alpha, 0 the identity, towards -1 flatter; default "
        f"{SOFTDECAY_RANK_ALPHA} (the official code's, for pooled sentence embeddings)")
    successive_halving: HalvingSpec | None = Field(default=None, description="rank many candidates on growing samples")
    tune: TuneSpec | None = None

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        """One message for the forms (pydantic's union would report a failure per form, at a nested location)."""
        if value is None or value in ("last", "all"):
            return value
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
        raise ValueError(f'expected "last", "all" or a list of layer indices; got {value!r}')


# ---- responses ------------------------------------------------------------------------------------------------


class Page(BaseModel, Generic[ItemT]):
    """One page of a list, newest first for datasets and jobs, oldest first for models."""

    items: list[ItemT]
    total: int = Field(description="items in the whole list")
    limit: int
    offset: int
    next_offset: int | None = Field(description="the offset of the next page; null on the last page")


class SerializationOut(BaseModel):
    method: Literal["lift"] = Field(description="lift: each row written as one sentence (docs/datasets.md#tables)")
    template: str = Field(description="how a row is written")
    examples: list[str] = Field(description="the first rows' sentences, as models read them")


class DatasetOut(BaseModel):
    id: str
    filename: str
    format: Literal["csv", "jsonl", "parquet", "zip"]
    task: Literal[TASKS]  # type: ignore[valid-type]
    modality: Literal[MODALITIES]  # type: ignore[valid-type]
    rows: int
    text_column: str | None = Field(description="text datasets: the column of the texts")
    text_pair_column: str | None = Field(description="text pairs: the column of the second texts")
    image_column: str | None = Field(description="image datasets: the column that named or held the images "
                                     "(null for a zip of class folders)")
    label_column: str | None = Field(description="null for a zip of class folders, whose labels are folder names")
    feature_columns: list[str] | None = Field(default=None, description="tables: the columns each row's sentence "
                                              "is written from, in order")
    serialization: SerializationOut | None = Field(default=None, description="tables: how rows became text")
    label_names: list[str] | None = Field(description="the classes, in label-index order; null for regression")
    class_counts: dict[str, int] | None = Field(description="rows per class (multilabel: rows containing it); "
                                                "null for regression")
    sha256: str = Field(description="of the uploaded file")
    size_bytes: int
    created_at: str = Field(description="ISO 8601")


class ModelOut(BaseModel):
    id: str
    name: str
    source: Literal["hf", "local", "checkpoint"]
    repo_id: str | None = Field(description="hf: the hub repository id")
    path: str | None = Field(description="local, checkpoint: the absolute folder, shown to admins only")
    shared: bool = Field(description="true: in the catalog every key sees (added by an admin); false: this key's "
                         "own entry, seen by it alone")
    revision: str = Field(description="hf: as registered (default main); local: a hash of the folder's files")
    modality: Literal[MODALITIES]  # type: ignore[valid-type]
    model_type: str | None
    architecture: str | None
    hidden_size: int | None = Field(description="the width of the ranked tower's features, when config.json says")
    has_source_head: bool = Field(description="a classification head with labels, which LEEP and NCE read")
    created_at: str = Field(description="ISO 8601")


class RankingEntryOut(BaseModel):
    """One candidate's place in a job's ranking. Besides these fields an entry carries the details its ranking
    recorded, as further keys: e.g. intervals (bootstrap intervals per estimator), p_better_than_next,
    features_cached, feature_dim, logme_prior_only, beats_prior, notes, error; successive halving adds
    eliminated, rows and p_leader_better."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    model: str = Field(description="the model's name")
    model_id: str
    rank: int = Field(description="1 is the best")
    scores: dict[str, float | None] = Field(description="per estimator; null where it does not apply")
    feature_seconds: float = Field(description="time spent extracting features (0 when they were cached)")


class JobOut(BaseModel):
    id: str
    status: JobStatus
    stage: str = Field(description="what the job is doing now, e.g. features 2/3")
    progress: float = Field(description="0 to 1")
    dataset_id: str
    candidates: list[str] = Field(description="the model ids ranked")
    metrics: list[str] = Field(description="the estimators, the first ranks")
    options: dict[str, Any] = Field(description="sample_size, seed, pooling, layers, feature_transform, "
                                    "softdecay_alpha, successive_halving as submitted (defaults filled in)")
    tune: dict[str, Any] | None = Field(description="the tune block as submitted, defaults filled in")
    ranking: list[RankingEntryOut] = Field(description="best first; empty until ranked")
    ranking_summary: dict[str, Any] | None = Field(description="job-level facts of the ranking (successive "
                                                   "halving's rounds)")
    ranked_by: dict[str, Any] | None = Field(default=None, description="what ordered the ranking: the estimator and "
                                             "the features it read (pooling, layers, transform)")
    verdict: dict[str, Any] | None = Field(default=None, description="what the ranking lets you conclude: top, "
                                           "confident, indistinguishable_from_top, below_prior, "
                                           "degenerate_estimators, static_baseline, summary (docs/estimators.md)")
    tuning: dict[str, Any] | None = Field(description="the tuned models with their held-out metrics")
    error: str | None
    attempts: int
    created_at: str = Field(description="ISO 8601")
    started_at: str | None = Field(description="ISO 8601")
    finished_at: str | None = Field(description="ISO 8601")


class JobStatusOut(BaseModel):
    """What a poll needs (GET /v1/jobs/{id}/status): one small read, no ranking."""

    id: str
    status: JobStatus
    phase: str = Field(description="rank, then tune when tuning was asked for")
    stage: str = Field(description="what the job is doing now, e.g. features 2/3")
    progress: float = Field(description="0 to 1")
    error: str | None
    attempts: int
    finished_at: str | None = Field(description="ISO 8601")


class CheckpointFileOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    path: str = Field(description="relative to the checkpoint; download at .../files/{path}")
    size: int
    sha256: str


class CheckpointOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    name: str
    model: str = Field(description="the name of the model it was tuned from")
    model_id: str
    files: list[CheckpointFileOut]


class RegularizerParam(BaseModel):
    default: Any
    doc: str
    choices: list[Any] | None = Field(default=None, description="present only for a parameter with fixed choices")


class DependencyHealth(BaseModel):
    """One dependency as /healthz saw it. `required`: the API cannot serve without it (503 when it is down)."""

    status: Literal["ok", "down", "unknown", "stale"]
    required: bool
    latency_ms: float | None = Field(description="how long the check took; null when it was not run")
    detail: str | None = None
    running_jobs: int | None = Field(default=None, description="worker: jobs running now")
    queued_jobs: int | None = Field(default=None, description="worker: jobs waiting for a worker")
    last_heartbeat_seconds_ago: float | None = Field(
        default=None, description="worker: age of the newest heartbeat of a running job")


class Health(BaseModel):
    status: Literal["ok"]
    checks: dict[str, DependencyHealth] = Field(description="database, broker and worker")


class FeatureMapModel(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model_id: str
    model: str = Field(description="the model's name")
    points: list[list[float]] = Field(description="[x, y] per shown row, in the order of `labels`")
    explained_variance: list[float] = Field(description="share of the variance on each axis (PC1, PC2)")


class FeatureMapOut(BaseModel):
    """Each scored model's features on the ranked rows, projected to 2-D by the worker when it ranked the job."""

    method: Literal["pca"]
    rows: int = Field(description="rows shown (a stratified sample of at most 300)")
    of_rows: int = Field(description="rows the ranking scored")
    task: Literal[TASKS]  # type: ignore[valid-type]
    labels: list[str | float] = Field(description="per shown row: the class (multilabel: labels joined by '+'), "
                                      "or the regression target")
    models: list[FeatureMapModel] = Field(description="in ranking order; successive halving: the last round's")

"""Request bodies of the API. Torch-free; the names they accept come from service.contract."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.contract import TuneSpec

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

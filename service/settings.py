"""Settings from the environment (prefix HUBTUNE_). Two services with different HUBTUNE_HOME share nothing."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HUBTUNE_", extra="ignore")

    home: Path = Field(default=Path("~/.hubtune"), description="All local state: SQLite, broker folder, artifacts.")
    # Artifacts (datasets, checkpoints, the feature cache): "" keeps them under HOME/artifacts; s3://bucket/prefix
    # puts them in S3-compatible storage (service/artifacts.py), with endpoint and credentials from AWS_* variables.
    artifacts_url: str = ""
    # With object storage: the local disk cache of what is read from it, and a worker's files in progress
    # (uploads being parsed, training state, features before upload); default ~/.cache/hubtune, never in HOME.
    cache_dir: Path | None = None
    cache_max_bytes: int = 20 * 1024**3  # the cache of objects read from the store; 0: no cap
    database_url: str | None = Field(default=None, description="Default: SQLite file in HOME.")
    broker_url: str | None = Field(default=None, description="Default: Celery filesystem:// broker in HOME.")
    max_upload_bytes: int = 512 * 1024 * 1024
    # A worker renews its lease every heartbeat; a job whose lease expired is re-queued by the reconciler.
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 5.0
    reconcile_seconds: float = 5.0
    # A queued job whose message may have been lost (API died after commit) is re-sent after this long.
    requeue_queued_after_seconds: float = 300.0
    max_attempts: int = 3
    # A rank job's coordinator checks this often whether the candidates other workers score are done.
    candidate_poll_seconds: float = 0.5
    # Keys: "auto" = keyless allowed only when the API is bound to a loopback host; "required" = always.
    auth: str = "auto"
    bind_host: str = "127.0.0.1"
    feature_max_length: int = 128
    feature_batch_size: int = 32
    # On a GPU small batches leave it idle: texts per forward pass there.
    feature_batch_size_gpu: int = 256
    rank_time_limit_seconds: int = 6 * 3600
    tune_time_limit_seconds: int = 12 * 3600
    bootstrap_samples: int = 200
    device: str | None = Field(default=None, description="torch device for workers; default cuda if present else cpu")
    # Request bodies other than a dataset upload (JSON of jobs and models); see service/api/limits.py.
    max_request_bytes: int = 1024 * 1024
    # What an upload may expand to once read (service.tabular.UploadLimits): one image file (a zip member or a
    # Parquet cell), one image's pixels, and all the images' pixels together.
    max_image_bytes: int = 128 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_upload_pixels: int = 1_000_000_000
    # Timeouts, so that a stopped or frozen dependency costs a bounded wait and a 503, never a hang. PostgreSQL:
    # the connect timeout (libpq's minimum is 2 s); the statement timeout, which is also how long the client waits
    # for any answer (a frozen server cancels nothing) and for a pooled connection; SQLite: its busy timeout.
    db_connect_timeout_seconds: float = 2.0
    db_statement_timeout_seconds: float = 3.0
    # Redis: connect and socket timeouts of every broker call (sending a job id, the health check).
    broker_timeout_seconds: float = 2.0
    # `hubtune serve` on SIGTERM: requests still running after this long are cancelled; the worker child, whose warm
    # shutdown starts at the same time, is killed after twice this long.
    shutdown_grace_seconds: float = 10.0
    # Who may register what, and what one key may hold (README "Keys and limits"); 0 or "" means no limit.
    model_roots: str = Field(default="", description="os.pathsep-separated folders below which admins register "
                             "local models")
    hub_allow: str = Field(default="", description="comma-separated fnmatch patterns of hub repo ids; empty: any")
    hub_max_bytes: int = 0  # a hub repository's download (the files HubTune fetches), checked before downloading
    key_max_active_jobs: int = 0  # queued + running jobs per key
    key_max_bytes: int = 0  # stored datasets + checkpoints per key
    key_rate_limit: int = 0  # requests per minute per key (a token bucket per API process)
    # The API's database connections (service.db.PoolLimits): kept open, and opened beyond them under load.
    db_pool_size: int = 10
    db_pool_overflow: int = 30
    # Log lines: "text" (the default) or "json", one object a line with job_id and model_id where known.
    log_format: Literal["text", "json"] = "text"

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def artifacts_dir(self) -> Path:
        return self.home_dir / "artifacts"

    @property
    def remote_artifacts(self) -> bool:
        return bool(self.artifacts_url)

    @property
    def cache_root_dir(self) -> Path:
        return (self.cache_dir or Path("~/.cache/hubtune")).expanduser().resolve()

    @property
    def _work_dir(self) -> Path:
        """Where files in progress are written: beside the artifacts, or in the local cache with object storage."""
        return self.cache_root_dir if self.remote_artifacts else self.artifacts_dir

    @property
    def datasets_dir(self) -> Path:
        return self.artifacts_dir / "datasets"

    @property
    def upload_scratch_dir(self) -> Path:
        """Uploads being parsed (service.datasets.upload_scratch): inside the datasets folder, so the finished
        folder is renamed into place; with object storage, in the local cache."""
        return self.cache_root_dir / "uploads" if self.remote_artifacts else self.datasets_dir

    @property
    def features_dir(self) -> Path:
        """The feature cache; with object storage, where entries are written before upload."""
        return self._work_dir / "features"

    @property
    def jobs_dir(self) -> Path:
        """Jobs' checkpoints, results and training state; with object storage, the worker's working copy (finished
        checkpoints are uploaded)."""
        return self._work_dir / "jobs"

    @property
    def hf_cache_dir(self) -> Path:
        return (self.cache_root_dir if self.remote_artifacts else self.home_dir) / "hf-cache"

    @property
    def broker_dir(self) -> Path:
        return self.home_dir / "broker"

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'hubtune.db'}"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def model_root_dirs(self) -> list[Path]:
        """HUBTUNE_MODEL_ROOTS, each resolved (symlinks followed), so a folder is compared to where it really is."""
        return [Path(root).expanduser().resolve() for root in self.model_roots.split(os.pathsep) if root.strip()]

    @property
    def hub_allow_patterns(self) -> list[str]:
        return [pattern.strip() for pattern in self.hub_allow.split(",") if pattern.strip()]

    def ensure_dirs(self) -> None:
        """The folders HubTune writes to; with object storage, nothing of the artifacts in HOME."""
        artifacts = (self.upload_scratch_dir, self.features_dir, self.jobs_dir) if self.remote_artifacts else (
            self.datasets_dir, self.features_dir, self.jobs_dir)
        broker = (self.broker_dir / "queue", self.broker_dir / "processed", self.broker_dir / "control")
        for folder in (self.home_dir, *artifacts, *broker):
            folder.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()

"""Persistence: SQLAlchemy 2 models and engine. The jobs table is the source of truth for every job."""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from service.contract import JobPhase, JobStatus
from service.contract.text import ID_LENGTH


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on both backends. SQLite stores no offset and returns naive values (a subclass
    of DateTime is replaced by SQLite's own DATETIME, so only a decorator sees every value): values are stored as
    UTC and come back marked as UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return as_utc(value)


def as_utc(value: datetime | None) -> datetime | None:
    """`value` as an aware UTC datetime (a naive one is taken to be UTC, as this service writes them)."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def iso_utc(value: datetime | None) -> str | None:
    """The ISO 8601 form of a timestamp in a response, always with its offset (+00:00); None stays None."""
    utc = as_utc(value)
    return utc.isoformat() if utc is not None else None


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), default="")
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    filename: Mapped[str] = mapped_column(String(500))
    format: Mapped[str] = mapped_column(String(16))
    task: Mapped[str] = mapped_column(String(16))
    modality: Mapped[str] = mapped_column(String(16), default="text")  # "text" | "image"
    # text datasets: text_column; image datasets: image_column (None for a zip of class folders, whose labels
    # are folder names and whose label_column is None too).
    text_column: Mapped[str | None] = mapped_column(String(200), nullable=True)
    text_pair_column: Mapped[str | None] = mapped_column(String(200), nullable=True)  # text pairs: the second text
    image_column: Mapped[str | None] = mapped_column(String(200), nullable=True)
    label_column: Mapped[str | None] = mapped_column(String(200), nullable=True)
    rows: Mapped[int] = mapped_column(Integer)
    label_names: Mapped[list | None] = mapped_column(JSON, nullable=True)
    class_counts: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    storage_path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class HubModel(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("source", "locator", "revision", name="uq_models_source_locator_revision"),)
    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(300))
    source: Mapped[str] = mapped_column(String(16))  # "hf" | "local"
    # hf: the repo id; local: the absolute folder path.
    locator: Mapped[str] = mapped_column(Text)
    revision: Mapped[str] = mapped_column(String(100), default="")
    modality: Mapped[str] = mapped_column(String(16), default="text")
    model_type: Mapped[str | None] = mapped_column(String(100), nullable=True)
    architecture: Mapped[str | None] = mapped_column(String(200), nullable=True)
    hidden_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    has_source_head: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    candidates: Mapped[list] = mapped_column(JSON)
    metrics: Mapped[list] = mapped_column(JSON)
    options: Mapped[dict] = mapped_column(JSON, default=dict)
    tune: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value, index=True)
    # phase picks the Celery task and queue: "rank" then, when tuning was asked for, "tune".
    phase: Mapped[str] = mapped_column(String(16), default=JobPhase.RANK.value)
    stage: Mapped[str] = mapped_column(String(64), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_token: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True, index=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    tuning: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # Job-level facts about the ranking (successive-halving rounds, time saved), beside the per-model rows.
    ranking_summary: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class RankingEntry(Base):
    __tablename__ = "rankings"
    __table_args__ = (UniqueConstraint("job_id", "model_id", name="uq_rankings_job_model"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    rank: Mapped[int] = mapped_column(Integer)
    scores: Mapped[dict] = mapped_column(JSON)
    details: Mapped[dict] = mapped_column(JSON, default=dict)
    feature_seconds: Mapped[float] = mapped_column(Float)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_checkpoints_job_name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    path: Mapped[str] = mapped_column(Text)
    files: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


def finite_json(value: Any) -> Any:
    """value with every NaN or infinite float replaced by None: JSON has no such numbers (PostgreSQL's json type
    rejects them, and the API's responses refuse them), and a diverged training run reports NaN losses."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def dumps_finite(value: Any) -> str:
    """The JSON columns' serializer (see finite_json)."""
    return json.dumps(finite_json(value), allow_nan=False)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               json_serializer=dumps_finite)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            # WAL lets the API read while a worker writes; busy_timeout waits instead of failing.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, json_serializer=dumps_finite)


@lru_cache
def engine_for(url: str) -> Engine:
    return make_engine(url)


def session_factory(url: str) -> sessionmaker:
    return sessionmaker(bind=engine_for(url), expire_on_commit=False)


def ranking_rows(session: Any, job_id: str) -> list[tuple[RankingEntry, HubModel]]:
    """A job's ranking entries with their models, best first: what the API shows and the tune phase reads."""
    query = (select(RankingEntry, HubModel).join(HubModel, HubModel.id == RankingEntry.model_id)
             .where(RankingEntry.job_id == job_id).order_by(RankingEntry.rank))
    return [(entry, model) for entry, model in session.execute(query).all()]

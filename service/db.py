"""Persistence: SQLAlchemy 2 models and engine. The jobs table is the source of truth for every job."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

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
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from service.contract import CandidateStatus, JobPhase, JobStatus
from service.contract.text import ID_LENGTH

if TYPE_CHECKING:
    from service.settings import Settings


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
    # "admin": manages the catalog, registers local folders, sees server paths; "user": everything else
    role: Mapped[str] = mapped_column(String(16), default="user", server_default="user")
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


# The owner of the shared catalog's entries (added by an admin, or before keys had roles); any other owner is the
# one key whose own addition the entry is, seen by that key alone.
CATALOG = ""


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
    # tables (LIFT): {"method": "lift", "feature_columns": [...], "examples": [the first sentences]}; text_column
    # is None and the sentences are the stored text
    serialization: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    rows: Mapped[int] = mapped_column(Integer)
    label_names: Mapped[list | None] = mapped_column(JSON, nullable=True)
    class_counts: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    storage_path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class HubModel(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("owner", "source", "locator", "revision",
                                       name="uq_models_owner_source_locator_revision"),)
    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(300))
    source: Mapped[str] = mapped_column(String(16))  # "hf" | "local" | "checkpoint"
    # hf: the repo id; local, checkpoint: the absolute folder path (never shown to a user key).
    locator: Mapped[str] = mapped_column(Text)
    owner: Mapped[str] = mapped_column(String(64), default=CATALOG, server_default=CATALOG)
    # Removed entries stay for the rankings and checkpoints that name them; no new job sees them.
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
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


class JobCandidate(Base):
    """One candidate's part of a job step, done by whichever worker claims it (its own lease, like a job's): the
    step's coordinator (the worker holding the job) goes on once every candidate is done. Steps: "rank" (score
    it), "halving-<round>" (a successive-halving round's features), "tune" (train it). `record` holds what it
    produced (scores and details, or a tuned model's summary and checkpoint; arrays stay in the artifact store)."""

    __tablename__ = "job_candidates"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[str] = mapped_column(String(32), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)  # in the job's candidate order
    status: Mapped[str] = mapped_column(String(16), default=CandidateStatus.QUEUED.value)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)  # host:pid that scored (or scores) it
    token: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    record: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


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


@dataclass(frozen=True)
class DatabaseTimeouts:
    """How long one database call may take (see Settings.db_*_timeout_seconds)."""

    connect_seconds: float = 2.0
    statement_seconds: float = 3.0

    @classmethod
    def from_settings(cls, settings: Settings) -> DatabaseTimeouts:
        return cls(settings.db_connect_timeout_seconds, settings.db_statement_timeout_seconds)

    @property
    def answer_seconds(self) -> float:
        """How long the client waits for a PostgreSQL answer: a little longer than the server's own statement
        timeout, so a live server's cancellation (a clear error) comes first and only a frozen one hits this."""
        return self.statement_seconds + 0.5


@dataclass(frozen=True)
class PoolLimits:
    """The connections one engine keeps open (`size`) and opens beyond them under load (`overflow`, closed when
    returned). The API's default of 10 + 30 covers the 40 threads its sync routes run on (AnyIO's default), so a
    burst of polls waits for the database, not for a connection (with SQLAlchemy's own 5 + 10, 25 of the 40 threads
    could queue for one and, past pool_timeout, answer 503). Workers keep SQLAlchemy's default."""

    size: int = 5
    overflow: int = 10

    @classmethod
    def from_settings(cls, settings: Settings) -> PoolLimits:
        return cls(settings.db_pool_size, settings.db_pool_overflow)


def make_engine(url: str, timeouts: DatabaseTimeouts | None = None, pool: PoolLimits = PoolLimits()) -> Engine:
    """The engine for `url`. With `timeouts`, no call waits longer than they say (the service's sessions); without
    (migrations, which may rewrite a large table), statements run as long as they need. Both backends pool their
    connections (QueuePool) within `pool`."""
    if url.startswith("sqlite"):
        busy_seconds = timeouts.statement_seconds if timeouts else 30.0
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": busy_seconds},
                               json_serializer=dumps_finite, pool_size=pool.size, max_overflow=pool.overflow)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            # WAL lets the API read while a worker writes; busy_timeout waits (a bounded time) instead of failing.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_seconds * 1000)}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    if timeouts is None:
        return create_engine(url, pool_pre_ping=True, json_serializer=dumps_finite)
    options = make_url(url).query.get("options", "")
    options = " ".join(o for o in (options if isinstance(options, str) else " ".join(options),
                                   f"-c statement_timeout={int(timeouts.statement_seconds * 1000)}") if o)
    connect_args = {"connect_timeout": max(2, math.ceil(timeouts.connect_seconds)), "options": options}
    engine = create_engine(url, pool_pre_ping=True, pool_timeout=timeouts.statement_seconds,
                           connect_args=connect_args, json_serializer=dumps_finite, pool_size=pool.size,
                           max_overflow=pool.overflow)
    connection_class = _answer_deadline_connection(timeouts.answer_seconds)

    @event.listens_for(engine, "do_connect")
    def _connect(_dialect, _record, cargs, cparams):  # type: ignore[no-untyped-def]
        return connection_class.connect(*cargs, **cparams)

    # The pool's ping before each checkout answers in milliseconds on a live server: on a frozen one, waiting the
    # whole statement timeout for it would only add to the wait for the 503. (This engine's own dialect instance.)
    ping = engine.dialect.do_ping

    def quick_ping(dbapi_connection: Any) -> bool:
        with dbapi_connection.answer_within(min(1.0, timeouts.answer_seconds)):
            return ping(dbapi_connection)

    engine.dialect.do_ping = quick_ping  # type: ignore[method-assign]
    return engine


def _answer_deadline_connection(seconds: float) -> type:
    """A psycopg connection class that waits at most `seconds` for any answer of the server. PostgreSQL's
    statement_timeout cannot fire on a frozen (SIGSTOPped) server, whose kernel still accepts the bytes: without
    this every request would wait for as long as the freeze lasts. On expiry the connection is closed (its protocol
    state is unknown), so SQLAlchemy sees a disconnect and the pool drops it."""
    import psycopg

    class AnswerDeadlineConnection(psycopg.Connection):
        answer_seconds = seconds

        def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
            limit = self.answer_seconds if timeout is None else timeout
            try:
                return super().wait(gen, interval, limit)
            except psycopg.errors._WaitTimeout as exc:  # psycopg's own wait timeout (3.2+)
                self.close()
                raise psycopg.OperationalError(f"the database did not answer within {limit:g} s") from exc

        @contextmanager
        def answer_within(self, limit: float) -> Iterator[None]:
            self.answer_seconds = limit
            try:
                yield
            finally:
                del self.answer_seconds  # back to the class's limit

    return AnswerDeadlineConnection


@lru_cache
def engine_for(url: str, timeouts: DatabaseTimeouts | None = None, pool: PoolLimits = PoolLimits()) -> Engine:
    return make_engine(url, timeouts, pool)


def session_factory(url: str, timeouts: DatabaseTimeouts | None = DatabaseTimeouts(),
                    pool: PoolLimits = PoolLimits()) -> sessionmaker:
    return sessionmaker(bind=engine_for(url, timeouts, pool), expire_on_commit=False)


def ranking_rows(session: Any, job_id: str) -> list[tuple[RankingEntry, HubModel]]:
    """A job's ranking entries with their models, best first: what the API shows and the tune phase reads."""
    return rankings_of(session, [job_id]).get(job_id, [])


def rankings_of(session: Any, job_ids: list[str]) -> dict[str, list[tuple[RankingEntry, HubModel]]]:
    """ranking_rows of several jobs in one query (a page of GET /v1/jobs), by job id; a job not ranked is absent."""
    query = (select(RankingEntry, HubModel).join(HubModel, HubModel.id == RankingEntry.model_id)
             .where(RankingEntry.job_id.in_(job_ids)).order_by(RankingEntry.job_id, RankingEntry.rank))
    found: dict[str, list[tuple[RankingEntry, HubModel]]] = {}
    for entry, model in session.execute(query).all():
        found.setdefault(entry.job_id, []).append((entry, model))
    return found

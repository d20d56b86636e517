"""Datasets: POST /v1/datasets (an upload, validated and normalised to Parquet), GET /v1/datasets[/{id}]."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from pydantic import AfterValidator
from sqlalchemy import select

from service import datasets as dataset_files
from service import lift
from service.api.deps import OwnerDep, PathText, SessionsDep, SettingsDep, owned_dataset
from service.api.metrics import record_upload
from service.api.pages import OffsetQuery, paginate
from service.api.problems import Problem, problem_responses
from service.api.quotas import check_stored_bytes
from service.artifacts import artifact_store, dataset_key
from service.contract.text import checked_text, text_error
from service.db import Dataset, iso_utc, new_id
from service.schemas import DatasetOut, Page, SerializationOut
from service.tabular import UploadLimits

router = APIRouter(prefix="/datasets", tags=["datasets"])

_COLUMN_LENGTH = Dataset.text_column.type.length
_FILENAME_LENGTH = Dataset.filename.type.length
_FEATURES_LENGTH = lift.MAX_FEATURE_COLUMNS * (_COLUMN_LENGTH + 4)  # as a JSON array: quotes, comma, space


def _checked_optional(value: str | None) -> str | None:
    return None if value is None else checked_text(value)


# A form field naming a column (or the task): storable text, no longer than the column that records it.
ColumnForm = Annotated[str, Form(max_length=_COLUMN_LENGTH), AfterValidator(checked_text)]
OptionalColumnForm = Annotated[str | None, Form(max_length=_COLUMN_LENGTH), AfterValidator(_checked_optional)]
FeatureColumnsForm = Annotated[str | None, Form(max_length=_FEATURES_LENGTH, description=(
    "tables (LIFT), instead of text_column: the columns each row's sentence is written from, in order, comma-"
    "separated (or a JSON array of names)")), AfterValidator(_checked_optional)]


def dataset_out(d: Dataset) -> DatasetOut:
    table = d.serialization
    serialization = None if not table else SerializationOut(method=table["method"], template=lift.TEMPLATE,
                                                           examples=table["examples"])
    return DatasetOut(id=d.id, filename=d.filename, format=d.format, task=d.task, modality=d.modality, rows=d.rows,
                      text_column=d.text_column, text_pair_column=d.text_pair_column, image_column=d.image_column,
                      label_column=d.label_column, feature_columns=table["feature_columns"] if table else None,
                      serialization=serialization, label_names=d.label_names, class_counts=d.class_counts,
                      sha256=d.sha256, size_bytes=d.size_bytes, created_at=iso_utc(d.created_at))


def checked_feature_columns(field: str | None, text_column: str | None) -> list[str] | None:
    """The feature columns named by the form (None: a text or image upload); a 422 when text_column is sent too."""
    if field is None:
        return None
    if text_column is not None:
        raise Problem(422, "text_column and feature_columns exclude each other", "a table's rows are written as "
                      "sentences from feature_columns; send text_column for a column of texts instead",
                      field="text_column")
    return dataset_files.feature_column_names(field)


def checked_filename(filename: str | None) -> str:
    """The uploaded file's name as recorded ("upload" if none), or a 422 naming `file` for one that cannot be."""
    name = filename or "upload"
    error = text_error(name)
    if error:
        raise Problem(422, "invalid file name", f"the file name {error}", field="file")
    if len(name) > _FILENAME_LENGTH:
        raise Problem(422, "file name too long", f"the file name has {len(name)} characters; at most "
                      f"{_FILENAME_LENGTH} are recorded", field="file")
    return name


@router.post("", status_code=201, responses=problem_responses(401, 413, 415, 422, 507))
async def upload_dataset(request: Request, settings: SettingsDep, sessions: SessionsDep, who: OwnerDep,
                         file: Annotated[UploadFile, File()], task: ColumnForm,
                         text_column: OptionalColumnForm = None, label_column: ColumnForm = "label",
                         image_column: OptionalColumnForm = None, text_pair_column: OptionalColumnForm = None,
                         feature_columns: FeatureColumnsForm = None) -> DatasetOut:
    """Upload CSV, JSON lines, Parquet or a zip of images; every rejection names the field and row at fault, and
    leaves nothing stored. The body is held to HUBTUNE_MAX_UPLOAD_BYTES while it arrives (service.api.limits).
    text_column defaults to "text"; a table sends feature_columns instead (its rows become LIFT sentences)."""
    features = checked_feature_columns(feature_columns, text_column)
    text_column = None if features else (text_column or "text")
    check_stored_bytes(sessions, who, settings)
    filename = checked_filename(file.filename)
    dataset_id = new_id()
    store, key = artifact_store(settings), dataset_key(dataset_id)
    stored = committed = False
    limits = UploadLimits(max_upload_bytes=settings.max_upload_bytes, max_image_bytes=settings.max_image_bytes,
                          max_image_pixels=settings.max_image_pixels, max_upload_pixels=settings.max_upload_pixels)
    with dataset_files.upload_scratch(settings.upload_scratch_dir) as scratch:  # removed whatever happens
        try:
            upload = scratch / "upload"
            size, sha256 = await dataset_files.stream_upload_to_disk(file, upload, settings.max_upload_bytes)
            await run_in_threadpool(check_stored_bytes, sessions, who, settings, size)
            with upload.open("rb") as fh:
                head = fh.read(8)
            fmt = dataset_files.detect_format(file.filename or "", file.content_type, head)
            parsed = await run_in_threadpool(dataset_files.parse_dataset, upload, fmt, task, text_column or "",
                                             label_column, image_column=image_column,
                                             text_pair_column=text_pair_column or None, limits=limits,
                                             feature_columns=features)
            staged = scratch / "data.parquet"
            await run_in_threadpool(dataset_files.write_normalized, parsed, task, staged)
            # the file appears whole (renamed locally, a completed multipart upload in S3), just before its row
            stored = True
            await run_in_threadpool(store.put_file, key, staged, move=True)
            with sessions.begin() as session:
                images = parsed.modality == "image"
                dataset = Dataset(id=dataset_id, owner=who, filename=filename, format=fmt, task=task,
                                  modality=parsed.modality, text_column=None if images else text_column,
                                  text_pair_column=text_pair_column or None, image_column=parsed.image_column,
                                  label_column=None if parsed.labels_from_folders else label_column,
                                  serialization=parsed.serialization,
                                  rows=parsed.rows, label_names=parsed.label_names,
                                  class_counts=parsed.class_counts, sha256=sha256, size_bytes=size,
                                  storage_path=store.location(key))
                session.add(dataset)
            committed = True  # the response describes a committed row; anything earlier failing removes the files
            record_upload(request.app.state, size)
            return dataset_out(dataset)
        finally:
            if stored and not committed:
                await run_in_threadpool(store.delete_prefix, f"datasets/{dataset_id}")


@router.get("", responses=problem_responses(401, 422))
def list_datasets(sessions: SessionsDep, who: OwnerDep, limit: Annotated[int, Query(ge=1, le=500)] = 50,
                  offset: OffsetQuery = 0) -> Page[DatasetOut]:
    """The key's datasets, newest first."""
    with sessions() as session:
        query = select(Dataset).where(Dataset.owner == who).order_by(Dataset.created_at.desc(), Dataset.id)
        return paginate(session, query, limit, offset, dataset_out, Page[DatasetOut])


@router.get("/{dataset_id}", responses=problem_responses(401, 404, 422))
def get_dataset(dataset_id: PathText, sessions: SessionsDep, who: OwnerDep) -> DatasetOut:
    with sessions() as session:
        return dataset_out(owned_dataset(session, dataset_id, who))

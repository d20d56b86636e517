"""Uploaded datasets: stream to disk under a byte cap, detect the format, validate, normalise to Parquet.

No torch/transformers here: the API imports this module, and the worker reads the normalised file back with
`read_normalized`. CSV and JSONL are parsed with the standard library so every error can name its row.

Rules (every rejection is a `DatasetProblem` the API renders as RFC 9457 problem+json):
- Formats: CSV (delimiter chosen from the header line: the most frequent of ",", TAB, ";"; ties go to ","),
  JSONL (one object per line; a .json file holding one JSON array of objects is read too), Parquet.
- Text: UTF-8, with or without a BOM. A decoding failure is reported with its row (CSV) or line (JSONL).
- Row numbers: `row` is 1-based and excludes the header. CSV: the n-th record after the header (blank lines count,
  a quoted field spanning lines is one record). JSONL: the line number in the file. JSON array / Parquet: the
  1-based element / row index.
- Columns: CSV header names are stripped of surrounding spaces and must be unique; JSONL columns are the union of
  the keys of all lines; `text_column` and `label_column` must exist and differ.
- Text cells must be non-blank strings. A label cell that is missing, null or blank is an error.
- Text pairs (`text_pair_column`, e.g. premise and hypothesis, question and passage): each example is the two
  texts of its row, both non-blank; models read them as the pair their tokenizer encodes ([CLS] a [SEP] b [SEP]).
- classification: labels are strings (stripped), integers, booleans ("true"/"false") or integral floats; at
  least two classes. `label_names` are the distinct labels as strings, sorted numerically when all look like
  integers, else lexically; labels are encoded as indices into `label_names`.
- multilabel: a cell is a list (JSON list, Parquet list column) or a string. A string starting with "[" is read as
  a JSON list; any other string is split on ONE separator for the whole dataset: the first of "|", ";", "," that
  occurs in any string label cell (so CSV "sport|politics"). Items are stripped; blank items are dropped; an empty
  list (`[]`) is allowed and means "no label applies" (a blank CSV cell is still a missing label). Labels are
  encoded as sorted lists of distinct class indices; at least two classes over the dataset.
- regression: labels must parse as finite floats ("abc", NaN and inf are rejected) below 1e15 in magnitude
  (service.labels.MAX_REGRESSION_TARGET: standardising them cannot overflow), and not all be equal (a constant
  target cannot rank or train anything).
- JSON (lines, arrays, list labels): nesting deeper than the parser follows, and strings holding a lone surrogate
  escape ("\\ud800", no Unicode text), are rejected with their row.
- Tables (LIFT): with `feature_columns` (a comma-separated list, or a JSON array of names) instead of
  `text_column`, each row's example is the sentence service.lift writes of those columns, in that order ("age is
  39, workclass is State-gov"); the label follows the rules above. The names must exist, be distinct and not
  include the label; at most MAX_FEATURE_COLUMNS of them; text_column, text_pair_column and image_column do not
  apply. A row whose feature cells are all missing, whose cell is a list or map, or whose sentence passes
  MAX_SENTENCE_CHARS is an error naming it; all sentences together may hold at most HUBTUNE_MAX_UPLOAD_BYTES
  characters (what a text upload may).
- Images: a zip, or Parquet with `image_column`; service.image_datasets holds their rules. Labels follow the rules
  above.
- Bounds: what an upload may expand to (columns, header length, Parquet cells and decoded bytes, zip members,
  pixels) is bounded by UploadLimits and the constants of service.tabular, each refusal naming its limit.
- Scratch: an upload is parsed inside its API process's locked scratch folder (upload_scratch); what a killed
  process left is removed when the next one starts (sweep_scratch).

This module is the entry point; the row readers live in service.tabular, the label rules in service.labels.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from service import image_datasets, lift
from service.contract import TASKS
from service.labels import MULTILABEL_SEPARATORS, ParsedDataset, check_row_count, encode_labels
from service.tabular import (
    CSV_DELIMITERS,
    FEATURE_KIND,
    MISSING,
    DatasetProblem,
    UploadLimits,
    check_text,
    csv_records,
    json_records,
    names_listed,
    parquet_records,
    show,
)

if TYPE_CHECKING:  # the API passes a Starlette UploadFile; typing only, so this module stays import-light
    from starlette.datastructures import UploadFile

# What callers of the upload rules import from here (some defined in service.labels and service.tabular).
__all__ = [
    "CSV_DELIMITERS", "FORMATS", "MULTILABEL_SEPARATORS", "DatasetProblem", "ParsedDataset", "UploadLimits",
    "check_feature_columns", "check_row_count", "detect_format", "encode_labels", "feature_column_names",
    "parse_dataset", "read_normalized", "stream_upload_to_disk", "sweep_scratch", "upload_scratch",
    "write_normalized",
]

FORMATS = ("csv", "jsonl", "parquet", "zip")

_EXTENSIONS: dict[str, str] = {
    ".csv": "csv", ".tsv": "csv", ".tab": "csv",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
    ".zip": "zip",
}
_CONTENT_TYPES: dict[str, str] = {
    "text/csv": "csv", "application/csv": "csv", "text/tab-separated-values": "csv",
    "application/jsonl": "jsonl", "application/x-jsonlines": "jsonl", "application/jsonlines": "jsonl",
    "application/x-ndjson": "jsonl", "application/ndjson": "jsonl", "application/json": "jsonl",
    "application/vnd.apache.parquet": "parquet", "application/x-parquet": "parquet", "application/parquet": "parquet",
    "application/zip": "zip", "application/x-zip-compressed": "zip",
}
_PARQUET_MAGIC = b"PAR1"
_ZIP_MAGIC = b"PK\x03\x04"


# ---- scratch space ---------------------------------------------------------------------------------------------
# An upload is copied, parsed and normalised inside a scratch folder of the API process that received it,
# DATASETS/.upload-<pid>-<random>/, which that process holds locked (flock) while any upload is in flight; only a
# finished dataset folder is moved into DATASETS. A process killed mid-upload leaves an unlocked folder, which the
# next API process to start removes (sweep_scratch): no age guess for folders, and a live process's are never touched.
SCRATCH_PREFIX = ".upload-"
_STAGING_PREFIX = ".staging-upload-"  # a scratch folder not yet locked; renamed once it is
_LOCK_NAME = ".lock"
STALE_SECONDS = 600.0  # scratch that no lock can vouch for (older versions' .upload-* files): removed this old


class _ProcessScratch:
    """This process's scratch folder in one datasets folder, locked while uploads use it, removed after the last."""

    def __init__(self, datasets_dir: Path) -> None:
        self.datasets_dir, self.users = datasets_dir, 0
        self.root: Path | None = None
        self._lock: Any = None

    def enter(self) -> Path:
        if self.root is None:
            staging = self.datasets_dir / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
            staging.mkdir(parents=True)
            lock = (staging / _LOCK_NAME).open("w")
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh file: nobody else holds it
            root = self.datasets_dir / f"{SCRATCH_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            staging.rename(root)  # visible to sweep_scratch only once locked
            self.root, self._lock = root, lock
        self.users += 1
        return self.root

    def leave(self) -> None:
        self.users -= 1
        if self.users == 0 and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self._lock.close()
            self.root = self._lock = None


_SCRATCH: dict[Path, _ProcessScratch] = {}


@contextmanager
def upload_scratch(datasets_dir: Path) -> Iterator[Path]:
    """A fresh folder for one upload's files inside this process's scratch folder; removed on exit, whatever
    happened. Call it from the event loop's thread (the API's async routes): the count of users is not locked."""
    scratch = _SCRATCH.setdefault(datasets_dir, _ProcessScratch(datasets_dir))
    folder = scratch.enter() / uuid.uuid4().hex
    try:
        folder.mkdir()
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        scratch.leave()


def sweep_scratch(datasets_dir: Path, stale_seconds: float = STALE_SECONDS) -> list[Path]:
    """Remove the scratch left by API processes that died mid-upload (see above); return what was removed."""
    removed: list[Path] = []
    if not datasets_dir.is_dir():
        return removed
    now = time.time()
    for entry in datasets_dir.iterdir():
        try:
            if _sweep_one(entry, now, stale_seconds):
                removed.append(entry)
        except OSError:
            continue  # removed meanwhile by another process starting
    return removed


def _sweep_one(entry: Path, now: float, stale_seconds: float) -> bool:
    if entry.name.startswith(SCRATCH_PREFIX) and (entry / _LOCK_NAME).is_file():
        with (entry / _LOCK_NAME).open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # its process is alive
            shutil.rmtree(entry, ignore_errors=True)
        return True
    if entry.name.startswith((SCRATCH_PREFIX, _STAGING_PREFIX)) and now - entry.stat().st_mtime > stale_seconds:
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        return True
    return False


# ---- upload ---------------------------------------------------------------------------------------------------
async def stream_upload_to_disk(upload: UploadFile, dest: Path, max_bytes: int,
                                chunk_size: int = 1 << 20) -> tuple[int, str]:
    """Copy the upload to `dest` chunk by chunk; return (size in bytes, sha256 hex). Nothing is left on rejection."""
    digest = hashlib.sha256()
    size = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with dest.open("wb") as out:
            while chunk := await upload.read(chunk_size):
                size += len(chunk)
                if size > max_bytes:  # stop reading at once: the rest of a huge upload is never stored
                    raise DatasetProblem(413, "file too large", f"the upload exceeds the limit of {max_bytes} "
                                         "bytes (HUBTUNE_MAX_UPLOAD_BYTES)", field="file")
                digest.update(chunk)
                out.write(chunk)  # local disk, one chunk: short enough not to need a thread
        if size == 0:
            raise DatasetProblem(422, "empty file", "the uploaded file has no content", field="file")
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return size, digest.hexdigest()


def detect_format(filename: str, content_type: str | None,
                  head: bytes) -> Literal["csv", "jsonl", "parquet", "zip"]:
    """The file's format from its extension, else its declared content type, else the Parquet or zip magic bytes."""
    suffix = Path(filename or "").suffix.lower()
    if suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]  # type: ignore[return-value]
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in _CONTENT_TYPES:
        return _CONTENT_TYPES[media]  # type: ignore[return-value]
    if head.startswith(_PARQUET_MAGIC):
        return "parquet"
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    raise DatasetProblem(415, "unsupported file type",
                         f"cannot read {filename or 'the upload'!r} ({content_type or 'no content type'}); send CSV "
                         "(.csv, .tsv), JSON lines (.jsonl, .ndjson, .json), Parquet (.parquet) or a zip of images "
                         "(.zip)", field="file")


# ---- parsing --------------------------------------------------------------------------------------------------
def parse_dataset(path: Path, fmt: str, task: str, text_column: str, label_column: str,
                  min_rows: int = 2, image_column: str | None = None, text_pair_column: str | None = None,
                  limits: UploadLimits | None = None, feature_columns: list[str] | None = None) -> ParsedDataset:
    """Validate the file against the task and columns; return examples and encoded labels (see the module rules).

    A zip is an image dataset (service.image_datasets); so is Parquet with `image_column` set. `limits` bound what
    the file may expand to once read (a zip's members, a Parquet file's dictionaries, images' pixels); default
    the settings' defaults. With text_pair_column each example is the pair (text, text_pair) of its row; with
    feature_columns (a table, LIFT) the sentence of its row, and text_column is not read."""
    limits = limits or UploadLimits()
    if task not in TASKS:
        raise DatasetProblem(422, "unknown task", f"task must be one of {', '.join(TASKS)}; got {task!r}",
                             field="task")
    if fmt not in FORMATS:
        raise DatasetProblem(415, "unsupported file type", f"unknown format {fmt!r}", field="file")
    if feature_columns is not None:
        if fmt == "zip" or image_column is not None:
            raise DatasetProblem(422, "feature columns are for tables", "feature_columns names the columns of a "
                                 "table (CSV, JSON lines, Parquet); an image dataset has none",
                                 field="image_column" if image_column is not None else "feature_columns")
        if text_pair_column is not None:
            raise DatasetProblem(422, "text pairs are for text datasets", "text_pair_column names a second text "
                                 "column; a table's rows are written as one sentence", field="text_pair_column")
        return _parse_table(path, fmt, task, feature_columns, label_column, min_rows, limits)
    if fmt == "zip" or image_column is not None:
        if text_pair_column is not None:
            raise DatasetProblem(422, "text pairs are for text datasets",
                                 "text_pair_column names a second text column; an image dataset has none",
                                 field="text_pair_column")
        return image_datasets.parse_images(path, fmt, task, label_column, image_column=image_column,
                                           min_rows=min_rows, limits=limits)
    if text_column == label_column:
        raise DatasetProblem(422, "same column for text and label", f"both are {text_column!r}",
                             field="label_column")
    columns = {"text": text_column}
    if text_pair_column is not None:
        if text_pair_column in (text_column, label_column):
            raise DatasetProblem(422, "same column twice", f"text_pair_column is {text_pair_column!r}, which is "
                                 "already the text or the label column", field="text_pair_column")
        columns["text_pair"] = text_pair_column
    columns["label"] = label_column
    if fmt == "csv":
        records: Iterable[tuple[int, list[Any]]] = csv_records(path, {k: v.strip() for k, v in columns.items()})
    elif fmt == "jsonl":
        records = json_records(path, columns)
    else:
        records = parquet_records(path, columns, limits.max_upload_bytes)

    examples: list[Any] = []
    raw_labels: list[Any] = []
    row_numbers: list[int] = []
    for row, cells in records:
        text = check_text(cells[0], row, text_column)
        examples.append(text if text_pair_column is None
                        else (text, check_text(cells[1], row, text_pair_column, field="text_pair_column")))
        raw_labels.append(cells[-1])
        row_numbers.append(row)
    check_row_count(len(examples), min_rows)
    return encode_labels(examples, raw_labels, row_numbers, task, label_column)


def feature_column_names(field: str) -> list[str]:
    """The `feature_columns` form field as names: a JSON array of strings (for names holding a comma), else the
    comma-separated names, each stripped. A DatasetProblem naming the field for an empty, repeated or surplus one."""
    if field.lstrip().startswith("["):
        try:
            names = json.loads(field)
        except ValueError as exc:
            raise DatasetProblem(422, "malformed feature columns", f"not a JSON array: {exc}",
                                 field="feature_columns") from exc
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DatasetProblem(422, "malformed feature columns", "a JSON array of feature columns holds strings "
                                 "only", field="feature_columns")
        names = [n.strip() for n in names]
    else:
        names = [n.strip() for n in field.split(",")]
    check_feature_columns(names)
    return names


def check_feature_columns(names: list[str]) -> None:
    """A DatasetProblem naming `feature_columns` for no names, an empty, a repeated one, or too many."""
    if not names or not all(names):
        raise DatasetProblem(422, "empty feature column", "feature_columns lists an empty name (two commas in a "
                             "row, or a trailing comma?)", field="feature_columns")
    if len(names) > lift.MAX_FEATURE_COLUMNS:
        raise DatasetProblem(422, "too many feature columns", f"{len(names)} feature columns; at most "
                             f"{lift.MAX_FEATURE_COLUMNS} are written into a sentence (models read its first "
                             "max_length tokens only)", field="feature_columns", limit="feature columns",
                             limit_value=lift.MAX_FEATURE_COLUMNS)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DatasetProblem(422, "repeated feature column", f"feature_columns lists {names_listed(repeated)} "
                             "more than once", field="feature_columns")


def _parse_table(path: Path, fmt: str, task: str, features: list[str], label_column: str, min_rows: int,
                 limits: UploadLimits) -> ParsedDataset:
    """A table's rows as LIFT sentences (service.lift) of `features`, with their labels (the module rules)."""
    check_feature_columns(features)
    if label_column in features:
        raise DatasetProblem(422, "label among the features", f"the label column {show(label_column)} is listed in "
                             "feature_columns: a model would read the answer", field="feature_columns")
    columns = {f"{FEATURE_KIND}{name}": name for name in features} | {"label": label_column}
    if fmt == "csv":
        records: Iterable[tuple[int, list[Any]]] = csv_records(path, columns)
    elif fmt == "jsonl":
        records = json_records(path, columns)
    else:
        records = parquet_records(path, columns, limits.max_upload_bytes)
    sentences: list[str] = []
    raw_labels: list[Any] = []
    row_numbers: list[int] = []
    total = 0
    for row, cells in records:
        sentence = _row_sentence(features, cells[:-1], row)
        total += len(sentence)
        if total > limits.max_upload_bytes:
            raise DatasetProblem(422, "sentences too long", f"by row {row} the rows' sentences hold more than "
                                 f"{limits.max_upload_bytes} characters (HUBTUNE_MAX_UPLOAD_BYTES, what a text "
                                 "upload may hold); list fewer feature columns", field="feature_columns", row=row,
                                 limit="HUBTUNE_MAX_UPLOAD_BYTES", limit_value=limits.max_upload_bytes)
        sentences.append(sentence)
        raw_labels.append(cells[-1])
        row_numbers.append(row)
    check_row_count(len(sentences), min_rows)
    parsed = encode_labels(sentences, raw_labels, row_numbers, task, label_column)
    parsed.serialization = {"method": "lift", "feature_columns": features,
                            "examples": sentences[:lift.EXAMPLES_SHOWN]}
    return parsed


def _row_sentence(features: list[str], cells: list[Any], row: int) -> str:
    texts: list[str | None] = []
    for name, cell in zip(features, cells):
        try:
            texts.append(None if cell is MISSING else lift.cell_text(cell))
        except ValueError as exc:
            raise DatasetProblem(422, "not a table cell", f"row {row}: {show(name)} holds {show(cell)}; {exc}",
                                 field="feature_columns", row=row) from exc
    sentence = lift.row_sentence(features, texts)
    if not sentence:
        raise DatasetProblem(422, "no feature values", f"row {row} has no value in any feature column",
                             field="feature_columns", row=row)
    if len(sentence) > lift.MAX_SENTENCE_CHARS:
        raise DatasetProblem(422, "sentence too long", f"row {row} is written as {len(sentence)} characters; at "
                             f"most {lift.MAX_SENTENCE_CHARS} (list fewer or shorter columns)",
                             field="feature_columns", row=row, limit="sentence characters",
                             limit_value=lift.MAX_SENTENCE_CHARS)
    return sentence


# ---- normalised storage ---------------------------------------------------------------------------------------
def write_normalized(parsed: ParsedDataset, task: str, dest: Path) -> None:
    """Write the examples (column text: string, with text_pair: string for pairs, or image: binary, the encoded
    file as uploaded) and label (int64 | list<int64> | float64) to `dest`, atomically (temp file + rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    label_types = {"classification": pa.int64(), "multilabel": pa.list_(pa.int64()), "regression": pa.float64()}
    if task not in label_types:
        raise ValueError(f"unknown task {task!r}")
    if parsed.modality == "image":
        columns = {"image": (pa.binary(), parsed.examples)}
    elif parsed.examples and isinstance(parsed.examples[0], tuple):
        columns = {"text": (pa.string(), [a for a, _ in parsed.examples]),
                   "text_pair": (pa.string(), [b for _, b in parsed.examples])}
    else:
        columns = {"text": (pa.string(), parsed.examples)}
    columns["label"] = (label_types[task], parsed.labels)
    metadata = {"hubtune.task": task, "hubtune.label_names": json.dumps(parsed.label_names),
                "hubtune.modality": parsed.modality}
    schema = pa.schema([(name, kind) for name, (kind, _) in columns.items()], metadata=metadata)
    table = pa.Table.from_pydict({name: values for name, (_, values) in columns.items()}, schema=schema)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("wb") as fh:
            pq.write_table(table, fh)
            fh.flush()
            os.fsync(fh.fileno())  # the rename must never expose a file whose bytes are not on disk yet
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def read_normalized(path: Path) -> tuple[list[Any], list[Any]]:
    """Examples (texts, (text, text_pair) tuples, or image files as bytes) and labels (ints, lists of ints, or
    floats) as written by `write_normalized`."""
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    column = "image" if "image" in names else "text"
    table = pq.read_table(path, columns=[column, "label", *(["text_pair"] if "text_pair" in names else [])])
    examples = table.column(column).to_pylist()
    if "text_pair" in names:
        examples = list(zip(examples, table.column("text_pair").to_pylist()))
    return examples, table.column("label").to_pylist()

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
- regression: labels must parse as finite floats ("abc", NaN and inf are rejected), and not all be equal (a
  constant target cannot rank or train anything).
- Images: a zip, or Parquet with `image_column`; service.image_datasets holds their rules. Labels follow the rules
  above.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from service.contract import TASKS

if TYPE_CHECKING:  # the API passes a Starlette UploadFile; typing only, so this module stays import-light
    from starlette.datastructures import UploadFile

FORMATS = ("csv", "jsonl", "parquet", "zip")
MULTILABEL_SEPARATORS = ("|", ";", ",")
CSV_DELIMITERS = (",", "\t", ";")

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
_BOM = codecs.BOM_UTF8
_INT_RE = re.compile(r"[+-]?\d+")
_MISSING = object()  # a key absent from a JSON object / a cell absent from a short CSV row


class DatasetProblem(Exception):
    """A rejected upload: status 413 (too large), 415 (unsupported type) or 422 (invalid content)."""

    def __init__(self, status: int, title: str, detail: str = "", field: str | None = None,
                 row: int | None = None, path: str | None = None) -> None:
        super().__init__(f"{title}: {detail}" if detail else title)
        self.status, self.title, self.detail, self.field, self.row = status, title, detail, field, row
        self.path = path  # the file inside an uploaded zip at fault, if any


@dataclass
class ParsedDataset:
    examples: list[Any]  # texts (str), text pairs (tuple[str, str]), or encoded image files (bytes) ("image")
    labels: list[Any]  # classification: int; multilabel: sorted list[int]; regression: float
    label_names: list[str] | None  # None for regression
    class_counts: dict[str, int] | None  # rows per label name (multilabel: rows containing it); None for regression
    rows: int
    modality: str = "text"  # "text" | "image"
    image_column: str | None = None  # the column that named or held the images (None for class folders)
    labels_from_folders: bool = False  # a zip of class folders: no label column


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
                  min_rows: int = 2, image_column: str | None = None,
                  max_image_bytes: int | None = None, text_pair_column: str | None = None) -> ParsedDataset:
    """Validate the file against the task and columns; return examples and encoded labels (see the module rules).

    A zip is an image dataset (service.image_datasets); so is Parquet with `image_column` set. max_image_bytes caps
    the images' uncompressed bytes (a zip's members can expand far beyond the upload). With text_pair_column each
    example is the pair (text, text_pair) of its row."""
    if task not in TASKS:
        raise DatasetProblem(422, "unknown task", f"task must be one of {', '.join(TASKS)}; got {task!r}",
                             field="task")
    if fmt not in FORMATS:
        raise DatasetProblem(415, "unsupported file type", f"unknown format {fmt!r}", field="file")
    if fmt == "zip" or image_column is not None:
        if text_pair_column is not None:
            raise DatasetProblem(422, "text pairs are for text datasets",
                                 "text_pair_column names a second text column; an image dataset has none",
                                 field="text_pair_column")
        from service import image_datasets

        return image_datasets.parse_images(path, fmt, task, label_column, image_column=image_column,
                                           min_rows=min_rows, max_bytes=max_image_bytes)
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
        records: Iterable[tuple[int, list[Any]]] = _csv_records(path, {k: v.strip() for k, v in columns.items()})
    elif fmt == "jsonl":
        records = _json_records(path, columns)
    else:
        records = _parquet_records(path, columns)

    examples: list[Any] = []
    raw_labels: list[Any] = []
    row_numbers: list[int] = []
    for row, cells in records:
        text = _check_text(cells[0], row, text_column)
        examples.append(text if text_pair_column is None
                        else (text, _check_text(cells[1], row, text_pair_column, field="text_pair_column")))
        raw_labels.append(cells[-1])
        row_numbers.append(row)
    check_row_count(len(examples), min_rows)
    return encode_labels(examples, raw_labels, row_numbers, task, label_column)


def check_row_count(rows: int, min_rows: int) -> None:
    if not rows:
        raise DatasetProblem(422, "no rows", "the file has a header or columns but no data rows", field="file")
    if rows < min_rows:
        raise DatasetProblem(422, "too few rows", f"{rows} row(s); at least {min_rows} are needed", field="file")


def encode_labels(examples: list[Any], raw_labels: list[Any], row_numbers: list[int], task: str,
                  label_column: str, modality: str = "text") -> ParsedDataset:
    """The parsed dataset: labels parsed and encoded for the task (the module rules), errors naming their row."""
    if task == "classification":
        names = [_class_label(v, r, label_column) for v, r in zip(raw_labels, row_numbers)]
        label_names = _sort_names(set(names))
        _need_two_classes(label_names, label_column)
        index = {name: i for i, name in enumerate(label_names)}
        labels: list[Any] = [index[n] for n in names]
        counts = dict.fromkeys(label_names, 0)
        for name in names:
            counts[name] += 1
        return ParsedDataset(examples, labels, label_names, counts, len(examples), modality)
    if task == "multilabel":
        separator = _pick_separator(raw_labels)
        sets = [_multi_labels(v, r, label_column, separator) for v, r in zip(raw_labels, row_numbers)]
        label_names = _sort_names(set().union(*sets))
        _need_two_classes(label_names, label_column)
        index = {name: i for i, name in enumerate(label_names)}
        labels = [sorted(index[n] for n in s) for s in sets]
        counts = dict.fromkeys(label_names, 0)
        for s in sets:
            for name in s:
                counts[name] += 1
        return ParsedDataset(examples, labels, label_names, counts, len(examples), modality)
    labels = [_number_label(v, r, label_column) for v, r in zip(raw_labels, row_numbers)]
    if len(set(labels)) < 2:
        raise DatasetProblem(422, "constant target", f"every value in {label_column!r} is {labels[0]!r}; a "
                             "regression target needs at least two distinct values", field="label_column")
    return ParsedDataset(examples, labels, None, None, len(examples), modality)


def _check_text(value: Any, row: int, column: str, field: str = "text_column") -> str:
    if value is _MISSING or value is None:
        raise DatasetProblem(422, "missing text", f"row {row} has no value in {column!r}", field=field, row=row)
    if not isinstance(value, str):
        raise DatasetProblem(422, "text is not a string", f"row {row}: {column!r} holds {_show(value)}",
                             field=field, row=row)
    if not value.strip():
        raise DatasetProblem(422, "empty text", f"row {row}: {column!r} is blank", field=field, row=row)
    return value


def _missing_label(value: Any) -> bool:
    return value is _MISSING or value is None or (isinstance(value, str) and not value.strip())


def _raise_missing_label(row: int, column: str, hint: str = "") -> None:
    raise DatasetProblem(422, "missing label", f"row {row} has no value in {column!r}{hint}", field="label_column",
                         row=row)


def _class_label(value: Any, row: int, column: str) -> str:
    """One classification label as its class name."""
    if _missing_label(value) or (isinstance(value, float) and math.isnan(value)):  # NaN: pandas' missing value
        _raise_missing_label(row, column)
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (float, Decimal)) and math.isfinite(value) and value == int(value):
        return str(int(value))  # 3.0 from a float Parquet/JSON column is class "3"
    raise DatasetProblem(422, "unparsable label", f"row {row}: {_show(value)} in {column!r} is not a class name "
                         "(a string or an integer); use task=regression for numeric targets",
                         field="label_column", row=row)


def _item_label(value: Any, row: int, column: str) -> str | None:
    """One element of a multi-label list as its class name; None for a blank string."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return str(int(value))
    raise DatasetProblem(422, "unparsable label", f"row {row}: list element {_show(value)} in {column!r} is not a "
                         "class name (a string or an integer)", field="label_column", row=row)


def _pick_separator(raw_labels: list[Any]) -> str:
    """The separator of multi-label string cells: the first of | ; , that occurs in any of them."""
    strings = [v for v in raw_labels if isinstance(v, str) and not v.lstrip().startswith("[")]
    for separator in MULTILABEL_SEPARATORS:
        if any(separator in s for s in strings):
            return separator
    return MULTILABEL_SEPARATORS[0]


def _multi_labels(value: Any, row: int, column: str, separator: str) -> set[str]:
    if _missing_label(value):
        _raise_missing_label(row, column, " (write [] for a row with no labels)")
    items: Iterable[Any]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except ValueError as exc:
                raise DatasetProblem(422, "unparsable label", f"row {row}: {column!r} starts with '[' but is not a "
                                     f"JSON list ({exc.msg})", field="label_column", row=row) from exc
            if not isinstance(items, list):
                raise DatasetProblem(422, "unparsable label", f"row {row}: {column!r} is not a JSON list",
                                     field="label_column", row=row)
        else:
            items = text.split(separator)
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        items = [value]  # a lone integer is a one-element list
    names = (_item_label(item, row, column) for item in items)
    return {n for n in names if n is not None}


def _number_label(value: Any, row: int, column: str) -> float:
    if _missing_label(value):
        _raise_missing_label(row, column)
    number: float | None = None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    elif isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        number = float(value)
    if number is None or not math.isfinite(number):
        raise DatasetProblem(422, "unparsable label", f"row {row}: {_show(value)} in {column!r} is not a finite "
                             "number", field="label_column", row=row)
    return number


def _sort_names(names: set[str]) -> list[str]:
    if names and all(_INT_RE.fullmatch(n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))  # "2" before "10"
    return sorted(names)


def _need_two_classes(label_names: list[str], column: str) -> None:
    if len(label_names) < 2:
        found = repr(label_names[0]) if label_names else "none"
        raise DatasetProblem(422, "a single class", f"{column!r} has one class ({found}); at least two are needed",
                             field="label_column")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unknown_column(kind: str, name: str, available: Iterable[str]) -> DatasetProblem:
    listed = ", ".join(repr(c) for c in available) or "none"
    return DatasetProblem(422, "unknown column", f"no column {name!r}; available columns: {listed}",
                          field=f"{kind}_column")


# ---- CSV ------------------------------------------------------------------------------------------------------
def _csv_records(path: Path, columns: dict[str, str]) -> Iterator[tuple[int, list[Any]]]:
    """(row, the cells of `columns` in order) per record; columns: kind ("text", "label", ...) -> header name."""
    # Long texts are legitimate; the csv module's default cap (131072 characters) is not a dataset rule.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    with path.open("r", encoding="utf-8-sig", newline="") as fh:
        record = 0  # records read after the header, blank ones included: the `row` of the next record
        delimiter = ","
        try:
            first = fh.readline()
            while first and not first.strip():  # blank lines before the header
                first = fh.readline()
            if not first:
                raise DatasetProblem(422, "empty file", "the file holds no header and no rows", field="file")
            delimiter = max(CSV_DELIMITERS, key=lambda d: (first.count(d), -CSV_DELIMITERS.index(d)))
            reader = csv.reader(itertools.chain([first], fh), delimiter=delimiter)
            header = [name.strip() for name in next(reader)]
            duplicates = sorted({n for n in header if header.count(n) > 1})
            if duplicates:
                raise DatasetProblem(422, "duplicate column names",
                                     f"the header repeats {', '.join(repr(d) for d in duplicates)}", field="file")
            for kind, name in columns.items():
                if name not in header:
                    raise _unknown_column(kind, name, header)
            at = [header.index(name) for name in columns.values()]
            for cells in reader:
                record += 1
                if not cells or (len(cells) == 1 and not cells[0].strip()):
                    continue  # a blank line is not a row
                if len(cells) != len(header):
                    raise DatasetProblem(422, "wrong number of fields",
                                         f"row {record} has {len(cells)} fields; the header has {len(header)} "
                                         f"(quote fields that contain {delimiter!r} or line breaks)",
                                         field="file", row=record)
                yield record, [cells[i] for i in at]
        except UnicodeDecodeError as exc:
            raise _csv_encoding_problem(path, delimiter) from exc
        except csv.Error as exc:
            raise DatasetProblem(422, "malformed CSV", f"row {record + 1}: {exc}", field="file",
                                 row=record + 1) from exc


def _csv_encoding_problem(path: Path, delimiter: str) -> DatasetProblem:
    """Name the CSV record holding the first byte that is not UTF-8 (the slow path, taken only on failure)."""
    data = path.read_bytes()
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        prefix = data[:exc.start].decode("utf-8")
        # A sentinel after the valid prefix makes the reader emit the record the bad byte belongs to, whether the
        # prefix ends inside a record or exactly at a record boundary.
        records = list(csv.reader(io.StringIO(prefix + "\x00"), delimiter=delimiter))
        skipped = 0
        while skipped < len(records) - 1 and not records[skipped]:  # blank lines before the header
            skipped += 1
        row = len(records) - 1 - skipped
        where = f"row {row}" if row > 0 else "the header"
        return DatasetProblem(422, "wrong encoding", f"{where} is not UTF-8 (byte 0x{data[exc.start]:02x} at "
                              f"offset {exc.start}); save the file as UTF-8", field="file",
                              row=row if row > 0 else None)
    return DatasetProblem(422, "wrong encoding", "the file is not UTF-8; save it as UTF-8", field="file")


# ---- JSON lines -----------------------------------------------------------------------------------------------
def _json_records(path: Path, columns: dict[str, str]) -> Iterator[tuple[int, list[Any]]]:
    """Records of a JSONL file (row = line number) or of a file holding one JSON array (row = element index): the
    values of `columns` (kind -> key) in order."""
    rows: list[tuple[int, list[Any]]] = []
    keys: dict[str, None] = {}  # insertion-ordered union of keys, for the "available columns" message
    for row, obj in _json_objects(path):
        if not isinstance(obj, dict):
            raise DatasetProblem(422, "malformed JSON", f"row {row} is {type(obj).__name__}, not an object",
                                 field="file", row=row)
        keys.update(dict.fromkeys(obj))
        rows.append((row, [obj.get(name, _MISSING) for name in columns.values()]))
    if not rows:
        raise DatasetProblem(422, "no rows", "the file holds no JSON objects", field="file")
    # A column present on some lines only is a per-row "missing" error later; on no line, an unknown column.
    for kind, name in columns.items():
        if name not in keys:
            raise _unknown_column(kind, name, list(keys)[:50])
    return iter(rows)


def _json_objects(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as fh:
        start = fh.read(4096)
    if start.startswith(_BOM):
        start = start[len(_BOM):]
    if start.lstrip()[:1] == b"[":
        yield from _json_array(path)
        return
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if line_no == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetProblem(422, "wrong encoding", f"line {line_no} is not UTF-8 (byte "
                                     f"0x{raw[exc.start]:02x}); save the file as UTF-8", field="file",
                                     row=line_no) from exc
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except ValueError as exc:
                raise DatasetProblem(422, "malformed JSON", f"line {line_no}: {exc}", field="file",
                                     row=line_no) from exc


def _json_array(path: Path) -> Iterator[tuple[int, Any]]:
    data = path.read_bytes()
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DatasetProblem(422, "wrong encoding", f"line {line} is not UTF-8 (byte 0x{data[exc.start]:02x}); "
                             "save the file as UTF-8", field="file") from exc
    try:
        items = json.loads(text)
    except ValueError as exc:
        raise DatasetProblem(422, "malformed JSON", str(exc), field="file") from exc
    if not isinstance(items, list):
        raise DatasetProblem(422, "malformed JSON", "expected one object per line or one array of objects",
                             field="file")
    yield from enumerate(items, start=1)


# ---- Parquet --------------------------------------------------------------------------------------------------
def _parquet_records(path: Path, columns: dict[str, str]) -> Iterator[tuple[int, list[Any]]]:
    """(row, the values of `columns` (kind -> column name) in order) per row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        names = list(parquet.schema_arrow.names)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetProblem(422, "unreadable Parquet file", str(exc), field="file") from exc
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetProblem(422, "duplicate column names",
                             f"the file repeats {', '.join(repr(d) for d in duplicates)}", field="file")
    text_column = columns["text"]
    if text_column not in names:
        problem = _unknown_column("text", text_column, names)
        schema = parquet.schema_arrow
        binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)
                  or (pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0)]
        if binary:  # most likely an image dataset sent without image_column
            problem.detail += (f"; {binary[0]!r} holds binary data: for an image dataset send "
                               f"image_column={binary[0]}")
        raise problem
    for kind, name in columns.items():
        if name not in names:
            raise _unknown_column(kind, name, names)
    try:
        table = parquet.read(columns=list(columns.values()))
    except (pa.ArrowException, OSError) as exc:
        raise DatasetProblem(422, "unreadable Parquet file", str(exc), field="file") from exc
    values = [_arrow_values(table.column(name), f"{kind}_column") for kind, name in columns.items()]
    if not table.num_rows:
        raise DatasetProblem(422, "no rows", "the Parquet file has columns but no rows", field="file")
    return ((i, list(cells)) for i, cells in enumerate(zip(*values), start=1))


def _arrow_values(column: Any, field: str) -> list[Any]:
    """Python values of an Arrow column; binary cells are decoded as UTF-8 with the failing row named."""
    import pyarrow as pa

    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        values = column.to_pylist()
        for i, value in enumerate(values):
            if value is not None:
                try:
                    values[i] = value.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DatasetProblem(422, "wrong encoding", f"row {i + 1} is not UTF-8", field=field,
                                         row=i + 1) from exc
        return values
    try:
        return column.to_pylist()
    except UnicodeDecodeError:  # a string column with invalid bytes: find the row
        for i in range(len(column)):
            try:
                column[i].as_py()
            except UnicodeDecodeError as exc:
                raise DatasetProblem(422, "wrong encoding", f"row {i + 1} is not UTF-8", field=field,
                                     row=i + 1) from exc
        raise


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

"""Rows out of CSV, JSON lines and Parquet files, every rejection naming its row: the readers behind the upload
rules in service.datasets (text datasets) and service.image_datasets (metadata files, image Parquet).

Each reader yields (row, the cells of the requested columns in order); a cell absent from its row is MISSING.
Torch-free and free of the HTTP layer: a rejection is a `DatasetProblem`, which the API renders as problem+json.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from service.contract.text import first_text_error

CSV_DELIMITERS = (",", "\t", ";")

_BOM = codecs.BOM_UTF8
MISSING = object()  # a key absent from a JSON object / a cell absent from a short CSV row


class DatasetProblem(Exception):
    """A rejected upload: status 413 (too large), 415 (unsupported type) or 422 (invalid content)."""

    def __init__(self, status: int, title: str, detail: str = "", field: str | None = None,
                 row: int | None = None, path: str | None = None) -> None:
        super().__init__(f"{title}: {detail}" if detail else title)
        self.status, self.title, self.detail, self.field, self.row = status, title, detail, field, row
        self.path = path  # the file inside an uploaded zip at fault, if any


def check_text(value: Any, row: int, column: str, field: str = "text_column") -> str:
    """A text cell's value; a DatasetProblem naming the row for a missing, non-string or blank one."""
    if value is MISSING or value is None:
        raise DatasetProblem(422, "missing text", f"row {row} has no value in {column!r}", field=field, row=row)
    if not isinstance(value, str):
        raise DatasetProblem(422, "text is not a string", f"row {row}: {column!r} holds {show(value)}",
                             field=field, row=row)
    if not value.strip():
        raise DatasetProblem(422, "empty text", f"row {row}: {column!r} is blank", field=field, row=row)
    return value


def show(value: Any) -> str:
    """A cell's repr for an error message, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def unknown_column(kind: str, name: str, available: Iterable[str]) -> DatasetProblem:
    """The problem for a column the file lacks, listing the ones it has; field is `<kind>_column`."""
    listed = ", ".join(repr(c) for c in available) or "none"
    return DatasetProblem(422, "unknown column", f"no column {name!r}; available columns: {listed}",
                          field=f"{kind}_column")


# ---- CSV ------------------------------------------------------------------------------------------------------
def csv_records(path: Path, columns: dict[str, str]) -> Iterator[tuple[int, list[Any]]]:
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
                    raise unknown_column(kind, name, header)
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
def json_records(path: Path, columns: dict[str, str]) -> Iterator[tuple[int, list[Any]]]:
    """Records of a JSONL file (row = line number) or of a file holding one JSON array (row = element index): the
    values of `columns` (kind -> key) in order."""
    rows: list[tuple[int, list[Any]]] = []
    keys: dict[str, None] = {}  # insertion-ordered union of keys, for the "available columns" message
    for row, obj in _json_objects(path):
        if not isinstance(obj, dict):
            raise DatasetProblem(422, "malformed JSON", f"row {row} is {type(obj).__name__}, not an object",
                                 field="file", row=row)
        keys.update(dict.fromkeys(obj))
        rows.append((row, [obj.get(name, MISSING) for name in columns.values()]))
    if not rows:
        raise DatasetProblem(422, "no rows", "the file holds no JSON objects", field="file")
    # A column present on some lines only is a per-row "missing" error later; on no line, an unknown column.
    for kind, name in columns.items():
        if name not in keys:
            raise unknown_column(kind, name, list(keys)[:50])
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
            yield line_no, parse_json(line, f"line {line_no}", row=line_no)


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
    items = parse_json(text, "", unicode=False)
    if not isinstance(items, list):
        raise DatasetProblem(422, "malformed JSON", "expected one object per line or one array of objects",
                             field="file")
    escapes = "\\u" in text
    for row, item in enumerate(items, start=1):
        if escapes:
            check_unicode(item, f"element {row}", row=row)
        yield row, item


def parse_json(text: str, where: str, field: str = "file", row: int | None = None, unicode: bool = True) -> Any:
    """json.loads(text), or a DatasetProblem naming `where` ("line 3"; "" for the whole file) and the row for JSON
    that is malformed or nested deeper than the parser can follow; with `unicode`, also for a lone surrogate escape
    (see check_unicode)."""
    prefix = f"{where}: " if where else ""
    try:
        value = json.loads(text)
    except RecursionError as exc:
        raise DatasetProblem(422, "malformed JSON", f"{prefix}nested too deeply", field=field, row=row) from exc
    except ValueError as exc:
        raise DatasetProblem(422, "malformed JSON", f"{prefix}{exc}", field=field, row=row) from exc
    if unicode and "\\u" in text:  # only a \u escape can spell a surrogate: the text itself is valid UTF-8
        check_unicode(value, where, field, row)
    return value


def check_unicode(value: Any, where: str, field: str = "file", row: int | None = None) -> None:
    """A DatasetProblem for a string in a parsed JSON value holding a lone surrogate ("\\ud800" decodes to one):
    no Unicode text, nothing could store or return it."""
    found = first_text_error(value, nul=False)
    if found:
        at = f"at {found[0].lstrip('.')}, " if found[0] else ""
        raise DatasetProblem(422, "not Unicode text", f"{where}: {at}{found[1]}" if where else f"{at}{found[1]}",
                             field=field, row=row)


# ---- Parquet --------------------------------------------------------------------------------------------------
def parquet_records(path: Path, columns: dict[str, str]) -> Iterator[tuple[int, list[Any]]]:
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
        problem = unknown_column("text", text_column, names)
        schema = parquet.schema_arrow
        binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)
                  or (pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0)]
        if binary:  # most likely an image dataset sent without image_column
            problem.detail += (f"; {binary[0]!r} holds binary data: for an image dataset send "
                               f"image_column={binary[0]}")
        raise problem
    for kind, name in columns.items():
        if name not in names:
            raise unknown_column(kind, name, names)
    try:
        table = parquet.read(columns=list(columns.values()))
    except (pa.ArrowException, OSError) as exc:
        raise DatasetProblem(422, "unreadable Parquet file", str(exc), field="file") from exc
    values = [arrow_values(table.column(name), f"{kind}_column") for kind, name in columns.items()]
    if not table.num_rows:
        raise DatasetProblem(422, "no rows", "the Parquet file has columns but no rows", field="file")
    return ((i, list(cells)) for i, cells in enumerate(zip(*values), start=1))


def arrow_values(column: Any, field: str) -> list[Any]:
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

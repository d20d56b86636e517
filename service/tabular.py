"""Rows out of CSV, JSON lines and Parquet files, every rejection naming its row: the readers behind the upload
rules in service.datasets (text datasets) and service.image_datasets (metadata files, image Parquet).

Each reader yields (row, the cells of the requested columns in order); a cell absent from its row is MISSING.
Torch-free and free of the HTTP layer: a rejection is a `DatasetProblem`, which the API renders as problem+json.

Bounds (an upload must not cost the server more than its size promises):
- A file has at most MAX_COLUMNS columns, and a CSV header at most MAX_HEADER_CHARS characters; header checks are
  linear in the number of columns.
- Parquet is checked on its metadata before a cell is read: at most MAX_ROW_GROUPS row groups, and the requested
  columns may hold no more cells (rows, or list items) than a CSV under the byte cap could (two bytes per cell:
  a character and a separator) and no more uncompressed bytes than the cap. Their string and binary cells are then
  read dictionary-encoded, and their decoded size must fit under the cap too before any becomes a Python value.
- Error messages name at most a few hundred characters of column names: the first ones and a count.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from service.contract.text import first_text_error
from service.lift import Single

CSV_DELIMITERS = (",", "\t", ";")
MAX_COLUMNS = 10_000  # HubTune reads two or three of them; wider files are feature tables or hostile
MAX_HEADER_CHARS = 1 << 20  # a CSV header line, all its column names together
MAX_ROW_GROUPS = 10_000  # a Parquet file's; writers make row groups of thousands of rows or more
MESSAGE_NAMES_CHARS = 300  # column names quoted in one error message

_BOM = codecs.BOM_UTF8
MISSING = object()  # a key absent from a JSON object / a cell absent from a short CSV row
FEATURE_KIND = "feature:"  # a reader's column kind for a feature column (LIFT): "feature:<name>"


def column_field(kind: str) -> str:
    """The form field that named a column of this kind: `feature_columns` for features, else `<kind>_column`."""
    return "feature_columns" if kind.startswith(FEATURE_KIND) else f"{kind}_column"


@dataclass(frozen=True)
class UploadLimits:
    """What one upload may expand to once read. Each field is the setting of the same name (service.settings,
    HUBTUNE_<FIELD>); the defaults here are its defaults."""

    max_upload_bytes: int = 512 * 1024 * 1024  # also the decoded cells of a Parquet file, and a zip's inflated files
    max_image_bytes: int = 128 * 1024 * 1024  # one image file (zip member or Parquet cell), inflated
    max_image_pixels: int = 40_000_000  # one image: 8000 × 5000
    max_upload_pixels: int = 1_000_000_000  # all the images of one upload: decoding them costs ~10 ns a pixel


class DatasetProblem(Exception):
    """A rejected upload: status 413 (too large), 415 (unsupported type) or 422 (invalid content). `limit` names
    the setting (HUBTUNE_...) or rule an upload broke, `limit_value` its value."""

    def __init__(self, status: int, title: str, detail: str = "", field: str | None = None,
                 row: int | None = None, path: str | None = None, limit: str | None = None,
                 limit_value: int | None = None) -> None:
        super().__init__(f"{title}: {detail}" if detail else title)
        self.status, self.title, self.detail, self.field, self.row = status, title, detail, field, row
        self.path = path  # the file inside an uploaded zip at fault, if any
        self.limit, self.limit_value = limit, limit_value


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


def names_listed(names: Iterable[str], limit: int = MESSAGE_NAMES_CHARS) -> str:
    """Column names for a message: each cut to 60 characters, the first ones up to about `limit` characters, then
    how many more there are ("'a', 'b' and 99998 more"); "none" for none."""
    shown: list[str] = []
    length = more = 0
    for name in names:
        if length <= limit:
            shown.append(show(name))
            length += len(shown[-1]) + 2
        else:
            more += 1
    return ", ".join(shown) + (f" and {more} more" if more else "") if shown else "none"


def unknown_column(kind: str, name: str, available: Iterable[str]) -> DatasetProblem:
    """The problem for a column the file lacks, listing (the first of) the ones it has; field as `column_field`."""
    return DatasetProblem(422, "unknown column", f"no column {show(name)}; available columns: "
                          f"{names_listed(available)}", field=column_field(kind))


def check_width(columns: int, what: str = "the header") -> None:
    if columns > MAX_COLUMNS:
        raise DatasetProblem(422, "too many columns", f"{what} has {columns} columns; at most {MAX_COLUMNS} are "
                             "read (keep the text, label and image columns)", field="file", limit="columns",
                             limit_value=MAX_COLUMNS)


def check_header(names: list[str], what: str = "the header") -> None:
    """A DatasetProblem for more than MAX_COLUMNS columns or for repeated names, in time linear in the columns."""
    check_width(len(names), what)
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise DatasetProblem(422, "duplicate column names", f"{what} repeats {len(repeated)} name(s): "
                             f"{names_listed(sorted(repeated))}", field="file")


# ---- CSV ------------------------------------------------------------------------------------------------------
def csv_records(path: Path, columns: dict[str, str]) -> Iterator[tuple[int, list[Any]]]:
    """(row, the cells of `columns` in order) per record; columns: kind ("text", "label", ...) -> header name."""
    # Long texts are legitimate; the csv module's default cap (131072 characters) is not a dataset rule.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    with path.open("r", encoding="utf-8-sig", newline="") as fh:
        record = 0  # records read after the header, blank ones included: the `row` of the next record
        delimiter = ","
        try:
            first = fh.readline(MAX_HEADER_CHARS + 1)
            while first and not first.strip():  # blank lines before the header
                first = fh.readline(MAX_HEADER_CHARS + 1)
            if not first:
                raise DatasetProblem(422, "empty file", "the file holds no header and no rows", field="file")
            delimiter = max(CSV_DELIMITERS, key=lambda d: (first.count(d), -CSV_DELIMITERS.index(d)))
            header = [name.strip() for name in next(csv.reader(_header_lines(first, fh), delimiter=delimiter))]
            check_header(header)
            position = {name: i for i, name in enumerate(header)}
            for kind, name in columns.items():
                if name not in position:
                    raise unknown_column(kind, name, header)
            at = [position[name] for name in columns.values()]
            # The header reader consumed exactly the header's lines: the rows are read from where it stopped.
            reader = csv.reader(fh, delimiter=delimiter)
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


def _header_lines(first: str, fh: TextIO) -> Iterator[str]:
    """The lines of a CSV header record (one, or more when a quoted name holds a line break), refused as soon as
    they pass MAX_HEADER_CHARS: a header is never read whole into memory to find that it is too long."""
    used = 0
    line = first
    while line:
        used += len(line)
        if used > MAX_HEADER_CHARS:
            raise DatasetProblem(422, "header too long", f"the header passes {MAX_HEADER_CHARS} characters",
                                 field="file", limit="header characters", limit_value=MAX_HEADER_CHARS)
        yield line
        line = fh.readline(MAX_HEADER_CHARS + 1)


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
            raise unknown_column(kind, name, keys)
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
def parquet_records(path: Path, columns: dict[str, str],
                    max_bytes: int = UploadLimits.max_upload_bytes) -> Iterator[tuple[int, list[Any]]]:
    """(row, the values of `columns` (kind -> column name) in order) per row; max_bytes bounds what the columns
    may expand to (see the module's bounds)."""
    import pyarrow as pa

    parquet = open_parquet(path)
    names = list(parquet.schema_arrow.names)
    text_column = columns.get("text")
    if text_column is not None and text_column not in names:
        problem = unknown_column("text", text_column, names)
        schema = parquet.schema_arrow
        binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)
                  or (pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0)]
        if binary:  # most likely an image dataset sent without image_column
            problem.detail += (f"; {show(binary[0])} holds binary data: for an image dataset send "
                               f"image_column={binary[0][:60]}")
        raise problem
    for kind, name in columns.items():
        if name not in names:
            raise unknown_column(kind, name, names)
    table = read_parquet_columns(path, parquet, list(columns.values()), max_bytes)
    values = [arrow_values(table.column(name), column_field(kind)) for kind, name in columns.items()]
    for i, (kind, name) in enumerate(columns.items()):
        if kind.startswith(FEATURE_KIND) and _is_single(table.column(name).type):
            values[i] = [None if v is None else Single(v) for v in values[i]]  # written as 32-bit floats
    if not table.num_rows:
        raise DatasetProblem(422, "no rows", "the Parquet file has columns but no rows", field="file")
    return ((i, list(cells)) for i, cells in enumerate(zip(*values), start=1))


def _is_single(kind: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_float32(kind) or pa.types.is_float16(kind)


def open_parquet(path: Path) -> Any:
    """The pyarrow ParquetFile, its width and row groups checked and its names unique (the metadata only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        metadata = parquet.metadata
        check_width(metadata.num_columns, "the file")  # leaf columns: at least as many as top-level ones
        if metadata.num_row_groups > MAX_ROW_GROUPS:
            raise DatasetProblem(422, "too many row groups", f"the file has {metadata.num_row_groups} row groups; "
                                 f"at most {MAX_ROW_GROUPS} are read (write larger ones)", field="file",
                                 limit="row groups", limit_value=MAX_ROW_GROUPS)
        names = list(parquet.schema_arrow.names)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetProblem(422, "unreadable Parquet file", str(exc)[:300], field="file") from exc
    check_header(names, "the file")
    return parquet


def read_parquet_columns(path: Path, parquet: Any, columns: list[str], max_bytes: int) -> Any:
    """The columns as a pyarrow Table of plain (not dictionary-encoded) arrays, after checking from the metadata,
    then from the dictionary-encoded cells, that they expand to no more than a CSV of max_bytes could hold."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    leaves = _leaves(parquet, columns)
    metadata = parquet.metadata
    groups = [metadata.row_group(g) for g in range(metadata.num_row_groups)]
    cells = max(metadata.num_rows * len(columns), sum(g.column(i).num_values for g in groups for i, _ in leaves))
    stored = sum(g.column(i).total_uncompressed_size for g in groups for i, _ in leaves)
    limit = "HUBTUNE_MAX_UPLOAD_BYTES"
    if 2 * cells > max_bytes:
        raise DatasetProblem(422, "too many cells", f"the columns read hold {cells} cells ({metadata.num_rows} "
                             f"rows); an upload of {max_bytes} bytes ({limit}) as CSV holds at most "
                             f"{max_bytes // 2}", field="file", limit=limit, limit_value=max_bytes)
    if stored > max_bytes:
        raise DatasetProblem(422, "too large once uncompressed", f"the columns read are {stored} bytes "
                             f"uncompressed; the limit is {max_bytes} ({limit})", field="file", limit=limit,
                             limit_value=max_bytes)
    dictionary = [leaf_path for _, leaf_path in leaves if leaf_path]
    try:
        table = pq.ParquetFile(path, read_dictionary=dictionary or None).read(columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetProblem(422, "unreadable Parquet file", str(exc)[:300], field="file") from exc
    decoded = sum(decoded_bytes(chunk) for column in table.columns for chunk in column.chunks)
    if decoded > max_bytes:
        raise DatasetProblem(422, "too large once decoded", f"the columns read decode to {decoded} bytes; the "
                             f"limit is {max_bytes} ({limit})", field="file", limit=limit, limit_value=max_bytes)
    return table.cast(pa.schema([field.with_type(_plain(field.type)) for field in table.schema]))


def _leaves(parquet: Any, columns: list[str]) -> list[tuple[int, str | None]]:
    """(leaf column index, its path if it holds strings or bytes, else None) of each of the named top-level
    columns; leaves follow the top-level fields in order, so a field's are counted from its type."""
    wanted = set(columns)
    schema = parquet.metadata.schema
    out: list[tuple[int, str | None]] = []
    index = 0
    for field in parquet.schema_arrow:
        kinds = _leaf_kinds(field.type)
        if field.name in wanted:
            out += [(index + k, schema.column(index + k).path if textual else None)
                    for k, textual in enumerate(kinds)]
        index += len(kinds)
    return out


def _leaf_kinds(kind: Any) -> list[bool]:
    """Per leaf of an Arrow type (depth first, as Parquet stores them): whether it holds strings or bytes."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        return _leaf_kinds(kind.value_type)
    if pa.types.is_struct(kind):
        return [leaf for i in range(kind.num_fields) for leaf in _leaf_kinds(kind.field(i).type)]
    if pa.types.is_map(kind):
        return _leaf_kinds(kind.key_type) + _leaf_kinds(kind.item_type)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _leaf_kinds(kind.value_type)
    return [pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)]


def decoded_bytes(array: Any) -> int:
    """The bytes an Arrow array takes once every dictionary is decoded, computed on the encoded array."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    if pa.types.is_dictionary(kind):
        if pa.types.is_nested(kind.value_type) or not _leaf_kinds(kind.value_type)[0]:
            return len(array) * 8  # numbers: a fixed width
        lengths = pc.binary_length(array.dictionary)
        return int(pc.sum(pc.take(lengths, array.indices)).as_py() or 0)
    if pa.types.is_struct(kind):
        return sum(decoded_bytes(child) for child in array.flatten())
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return decoded_bytes(array.flatten()) + 8 * len(array)
    if pa.types.is_map(kind):
        return decoded_bytes(array.keys) + decoded_bytes(array.items) + 8 * len(array)
    if _leaf_kinds(kind)[0]:
        return int(pc.sum(pc.binary_length(array)).as_py() or 0)
    return len(array) * 8


def _plain(kind: Any) -> Any:
    """The Arrow type with every dictionary replaced by its value type."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        return _plain(kind.value_type)
    if pa.types.is_struct(kind):
        return pa.struct([kind.field(i).with_type(_plain(kind.field(i).type)) for i in range(kind.num_fields)])
    if pa.types.is_large_list(kind):
        return pa.large_list(kind.value_field.with_type(_plain(kind.value_type)))
    if pa.types.is_list(kind):
        return pa.list_(kind.value_field.with_type(_plain(kind.value_type)))
    return kind


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

"""Dataset upload rules (service/datasets.py): formats, columns, encodings, labels, the byte cap, normalised Parquet."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from starlette.datastructures import Headers, UploadFile

from service.datasets import (
    DatasetProblem,
    ParsedDataset,
    detect_format,
    parse_dataset,
    read_normalized,
    stream_upload_to_disk,
    write_normalized,
)


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def jsonl(tmp_path: Path, rows: list[Any], name: str = "d.jsonl") -> Path:
    return write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in rows))


def parquet(tmp_path: Path, table: pa.Table, name: str = "d.parquet") -> Path:
    path = tmp_path / name
    pq.write_table(table, path)
    return path


def problem(path: Path, fmt: str, task: str = "classification", text: str = "text", label: str = "label",
            **kw: Any) -> DatasetProblem:
    with pytest.raises(DatasetProblem) as info:
        parse_dataset(path, fmt, task, text, label, **kw)
    return info.value


# ---- formats --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, content_type, head, expected", [
    ("a.csv", None, b"", "csv"), ("A.TSV", None, b"", "csv"), ("a.jsonl", None, b"", "jsonl"),
    ("a.ndjson", None, b"", "jsonl"), ("a.json", None, b"", "jsonl"), ("a.parquet", None, b"", "parquet"),
    ("upload", "text/csv; charset=utf-8", b"", "csv"), ("x.txt", "application/x-ndjson", b"", "jsonl"),
    ("blob", "application/octet-stream", b"PAR1\x15\x04", "parquet"),
    ("a.csv", "application/octet-stream", b"PAR1", "csv"),  # the extension wins over the content
    ("a.zip", None, b"", "zip"), ("blob", "application/zip", b"", "zip"), ("blob", None, b"PK\x03\x04", "zip"),
])
def test_detect_format(name: str, content_type: str | None, head: bytes, expected: str) -> None:
    assert detect_format(name, content_type, head) == expected


@pytest.mark.parametrize("name, content_type", [("a.xlsx", None), ("a.rar", "application/x-rar"),
                                                 ("notes.txt", "text/plain"), ("", None)])
def test_unsupported_type_is_415(name: str, content_type: str | None) -> None:
    with pytest.raises(DatasetProblem) as info:
        detect_format(name, content_type, b"hello")
    assert (info.value.status, info.value.field) == (415, "file")


# ---- CSV ------------------------------------------------------------------------------------------------------
def test_csv_quoted_commas_newlines_and_numeric_class_order(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", 'id,text,label\n1,"hello, world",10\n2,"two\nlines, ""quoted""",2\n'
                 '3,plain,10\n')
    parsed = parse_dataset(path, "csv", "classification", "text", "label")
    assert parsed.examples == ["hello, world", 'two\nlines, "quoted"', "plain"]
    assert parsed.label_names == ["2", "10"]  # numeric order, not "10" < "2"
    assert parsed.labels == [1, 0, 1]
    assert parsed.class_counts == {"2": 1, "10": 2}
    assert parsed.rows == 3


def test_csv_string_labels_sorted_and_stripped(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", "text , label\nA,sport\nB, business\nC,sport\n\n")
    parsed = parse_dataset(path, "csv", "classification", "text", "label")
    assert parsed.label_names == ["business", "sport"]
    assert parsed.labels == [1, 0, 1]
    assert parsed.rows == 3  # the trailing blank line is no row


def test_tsv_and_semicolon_delimiters(tmp_path: Path) -> None:
    tsv = write(tmp_path, "d.tsv", "text\tlabel\nhello, there\ta\nbye\tb\n")
    assert parse_dataset(tsv, "csv", "classification", "text", "label").examples == ["hello, there", "bye"]
    semi = write(tmp_path, "s.csv", "text;label\nx;a\ny;b\n")
    assert parse_dataset(semi, "csv", "classification", "text", "label").label_names == ["a", "b"]


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", b"\xef\xbb\xbftext,label\ncaf\xc3\xa9,a\nb,b\n")
    parsed = parse_dataset(path, "csv", "classification", "text", "label")
    assert parsed.examples == ["café", "b"]  # the header's first name is "text", not "\ufefftext"
    bom_jsonl = write(tmp_path, "d.jsonl", b'\xef\xbb\xbf{"text": "x", "label": "a"}\n{"text": "y", "label": "b"}\n')
    assert parse_dataset(bom_jsonl, "jsonl", "classification", "text", "label").rows == 2


@pytest.mark.parametrize("bad_row", ["caf\u00e9,b", "\u00e9t\u00e9,b", '"two\nlines \u00e9",b', 'x,"\u00e9"'])
def test_latin1_csv_names_the_row(tmp_path: Path, bad_row: str) -> None:
    # Row 3's text spans two lines, so the bad byte on row 4 sits on physical line 6 or 7: the row, not the line.
    content = f'text,label\nok,a\nfine,b\n"two\nlines",a\n{bad_row}\nlast,a\n'.encode("latin-1")
    err = problem(write(tmp_path, "d.csv", content), "csv")
    assert (err.status, err.title, err.field, err.row) == (422, "wrong encoding", "file", 4)


def test_latin1_deep_in_a_large_csv(tmp_path: Path) -> None:
    lines = ["text,label"] + [f"row number {i},{i % 2}" for i in range(1, 5000)] + ["na\xefve,1"]
    err = problem(write(tmp_path, "d.csv", ("\n".join(lines) + "\n").encode("latin-1")), "csv")
    assert (err.status, err.row) == (422, 5000)


def test_latin1_header_has_no_row(tmp_path: Path) -> None:
    err = problem(write(tmp_path, "d.csv", "t\u00e9xt,label\na,b\n".encode("latin-1")), "csv")
    assert (err.status, err.title, err.row) == (422, "wrong encoding", None)
    assert "header" in err.detail


def test_unknown_columns_list_the_available_ones(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", "body,category\nx,a\ny,b\n")
    err = problem(path, "csv")
    assert (err.status, err.field) == (422, "text_column")
    assert "'body'" in err.detail and "'category'" in err.detail
    err = problem(path, "csv", text="body", label="label")
    assert (err.status, err.field) == (422, "label_column")


def test_duplicate_header_names(tmp_path: Path) -> None:
    err = problem(write(tmp_path, "d.csv", "text,label,label\nx,a,b\ny,b,a\n"), "csv")
    assert (err.status, err.title, err.field) == (422, "duplicate column names", "file")


def test_header_only_and_empty_files(tmp_path: Path) -> None:
    err = problem(write(tmp_path, "d.csv", "text,label\n"), "csv")
    assert (err.status, err.title) == (422, "no rows")
    err = problem(write(tmp_path, "e.csv", "\n\n"), "csv")
    assert (err.status, err.title) == (422, "empty file")
    err = problem(write(tmp_path, "one.csv", "text,label\nx,a\n"), "csv")
    assert (err.status, err.title) == (422, "too few rows")


def test_wrong_number_of_fields(tmp_path: Path) -> None:
    err = problem(write(tmp_path, "d.csv", "text,label\nx,a\nhello, world,b\n"), "csv")
    assert (err.status, err.field, err.row) == (422, "file", 2)


@pytest.mark.parametrize("content, field, row, title", [
    ("text,label\nx,a\n,b\n", "text_column", 2, "empty text"),
    ("text,label\nx,a\n   ,b\n", "text_column", 2, "empty text"),
    ("text,label\nx,a\ny,b\nz,\n", "label_column", 3, "missing label"),
])
def test_blank_cells_name_the_row(tmp_path: Path, content: str, field: str, row: int, title: str) -> None:
    err = problem(write(tmp_path, "d.csv", content), "csv")
    assert (err.status, err.title, err.field, err.row) == (422, title, field, row)


def test_single_class(tmp_path: Path) -> None:
    err = problem(write(tmp_path, "d.csv", "text,label\nx,a\ny,a\n"), "csv")
    assert (err.status, err.title, err.field) == (422, "a single class", "label_column")


def test_constant_regression_target(tmp_path: Path) -> None:
    err = problem(write(tmp_path, "d.csv", "text,y\nx,2.5\ny,2.50\nz,2.5e0\n"), "csv", task="regression", label="y")
    assert (err.status, err.title, err.field) == (422, "constant target", "label_column")


def test_unknown_task_and_same_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", "text,label\nx,a\ny,b\n")
    err = problem(path, "csv", task="ranking")
    assert (err.status, err.field) == (422, "task")
    err = problem(path, "csv", label="text")
    assert (err.status, err.field) == (422, "label_column")


# ---- regression -----------------------------------------------------------------------------------------------
def test_regression_values(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", "text,label\nx,1.5\ny, -2e3 \nz,7\n")
    parsed = parse_dataset(path, "csv", "regression", "text", "label")
    assert parsed.labels == [1.5, -2000.0, 7.0]
    assert parsed.label_names is None and parsed.class_counts is None


@pytest.mark.parametrize("bad", ["abc", "nan", "NaN", "inf", "-Infinity", "1,5"])
def test_regression_rejects_non_finite_and_text(tmp_path: Path, bad: str) -> None:
    path = write(tmp_path, "d.csv", f'text,label\nx,1\ny,2\nz,"{bad}"\n')
    err = problem(path, "csv", task="regression")
    assert (err.status, err.title, err.field, err.row) == (422, "unparsable label", "label_column", 3)


def test_regression_jsonl_rejects_nan_and_bool(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", '{"text": "x", "label": 1}\n{"text": "y", "label": NaN}\n')
    assert problem(path, "jsonl", task="regression").row == 2
    path = jsonl(tmp_path, [{"text": "x", "label": 1}, {"text": "y", "label": True}])
    assert problem(path, "jsonl", task="regression").row == 2


# ---- multilabel -----------------------------------------------------------------------------------------------
def test_multilabel_csv_pipe_separated_and_empty_list(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", "text,label\nx,sport|politics\ny,politics\nz,[]\nw, tech | sport \n")
    parsed = parse_dataset(path, "csv", "multilabel", "text", "label")
    assert parsed.label_names == ["politics", "sport", "tech"]
    assert parsed.labels == [[0, 1], [0], [], [1, 2]]
    assert parsed.class_counts == {"politics": 2, "sport": 2, "tech": 1}


def test_multilabel_separator_precedence(tmp_path: Path) -> None:
    # "|" occurs somewhere, so commas stay inside names.
    path = write(tmp_path, "d.csv", 'text,label\nx,"a, b|c"\ny,c\n')
    assert parse_dataset(path, "csv", "multilabel", "text", "label").label_names == ["a, b", "c"]
    path = write(tmp_path, "e.csv", 'text,label\nx,"a, b"\ny,c;a\n')  # ";" before ","
    assert parse_dataset(path, "csv", "multilabel", "text", "label").label_names == ["a", "a, b", "c"]
    path = write(tmp_path, "f.csv", 'text,label\nx,"a, b"\ny,c\n')
    assert parse_dataset(path, "csv", "multilabel", "text", "label").label_names == ["a", "b", "c"]


def test_multilabel_jsonl_lists_and_json_strings(tmp_path: Path) -> None:
    path = jsonl(tmp_path, [{"text": "x", "label": ["b", "a", "a"]}, {"text": "y", "label": []},
                            {"text": "z", "label": '["c"]'}, {"text": "w", "label": [3]}])
    parsed = parse_dataset(path, "jsonl", "multilabel", "text", "label")
    assert parsed.label_names == ["3", "a", "b", "c"]
    assert parsed.labels == [[1, 2], [], [3], [0]]


def test_multilabel_missing_and_single_class(tmp_path: Path) -> None:
    err = problem(write(tmp_path, "d.csv", "text,label\nx,a|b\ny,\n"), "csv", task="multilabel")
    assert (err.title, err.row) == ("missing label", 2)
    err = problem(jsonl(tmp_path, [{"text": "x", "label": ["a"]}, {"text": "y", "label": []}]), "jsonl",
                  task="multilabel")
    assert err.title == "a single class"
    err = problem(jsonl(tmp_path, [{"text": "x", "label": ["a"]}, {"text": "y", "label": [{"k": 1}]}]), "jsonl",
                  task="multilabel")
    assert (err.title, err.row) == ("unparsable label", 2)


# ---- JSONL ----------------------------------------------------------------------------------------------------
def test_jsonl_ints_bools_and_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", '{"text": "x", "label": 2}\n\n{"text": "y", "label": 10}\n'
                 '{"text": "z", "label": 2.0}\n')
    parsed = parse_dataset(path, "jsonl", "classification", "text", "label")
    assert (parsed.label_names, parsed.labels) == (["2", "10"], [0, 1, 0])
    bools = jsonl(tmp_path, [{"text": "x", "label": True}, {"text": "y", "label": False}], name="b.jsonl")
    assert parse_dataset(bools, "jsonl", "classification", "text", "label").label_names == ["false", "true"]


@pytest.mark.parametrize("lines, title, field, row", [
    (['{"text": "x", "label": "a"}', "", '{"text": "y"}'], "missing label", "label_column", 3),
    (['{"text": "x", "label": "a"}', '{"text": "y", "label": null}'], "missing label", "label_column", 2),
    (['{"text": "x", "label": "a"}', '{"text": 5, "label": "b"}'], "text is not a string", "text_column", 2),
    (['{"text": "x", "label": "a"}', '{"label": "b"}'], "missing text", "text_column", 2),
    (['{"text": "x", "label": "a"}', '{"text": "y", "label": 0.5}'], "unparsable label", "label_column", 2),
    (['{"text": "x", "label": "a"}', '{"text": "y", "label": ["b"]}'], "unparsable label", "label_column", 2),
    (['{"text": "x", "label": "a"}', '{"text": "y", "label": "b"', ''], "malformed JSON", "file", 2),
    (['{"text": "x", "label": "a"}', '["y", "b"]'], "malformed JSON", "file", 2),
])
def test_jsonl_errors_name_the_line(tmp_path: Path, lines: list[str], title: str, field: str, row: int) -> None:
    err = problem(write(tmp_path, "d.jsonl", "\n".join(lines) + "\n"), "jsonl")
    assert (err.status, err.title, err.field, err.row) == (422, title, field, row)


def test_jsonl_latin1_line(tmp_path: Path) -> None:
    content = '{"text": "x", "label": "a"}\n{"text": "y", "label": "b"}\n{"text": "caf\u00e9", "label": "a"}\n'
    err = problem(write(tmp_path, "d.jsonl", content.encode("latin-1")), "jsonl")
    assert (err.status, err.title, err.row) == (422, "wrong encoding", 3)


def test_jsonl_unknown_column_lists_keys(tmp_path: Path) -> None:
    err = problem(jsonl(tmp_path, [{"body": "x", "label": "a"}, {"body": "y", "label": "b", "extra": 1}]), "jsonl")
    assert (err.field, err.status) == ("text_column", 422)
    assert "'body'" in err.detail and "'extra'" in err.detail


def test_json_array_file(tmp_path: Path) -> None:
    path = write(tmp_path, "d.json", json.dumps([{"text": "x", "label": "a"}, {"text": "y", "label": "b"},
                                                 {"text": "z", "label": None}]))
    err = problem(path, "jsonl")
    assert (err.title, err.row) == ("missing label", 3)


# ---- Parquet --------------------------------------------------------------------------------------------------
def test_parquet_classification_with_nulls_and_categories(tmp_path: Path) -> None:
    table = pa.table({"text": ["x", "y", "z"],
                      "label": pa.array(["b", "a", "b"]).dictionary_encode()})
    parsed = parse_dataset(parquet(tmp_path, table), "parquet", "classification", "text", "label")
    assert (parsed.label_names, parsed.labels, parsed.class_counts) == (["a", "b"], [1, 0, 1], {"a": 1, "b": 2})
    table = pa.table({"text": ["x", "y", "z"], "label": pa.array([1, None, 0], pa.int64())})
    err = problem(parquet(tmp_path, table, "n.parquet"), "parquet")
    assert (err.title, err.field, err.row) == ("missing label", "label_column", 2)
    table = pa.table({"text": ["x", "y"], "label": pa.array([1.0, float("nan")])})
    err = problem(parquet(tmp_path, table, "f.parquet"), "parquet")
    assert (err.title, err.row) == ("missing label", 2)


def test_parquet_multilabel_list_column_and_unknown_column(tmp_path: Path) -> None:
    table = pa.table({"text": ["x", "y", "z"], "tags": pa.array([["a", "b"], [], ["b"]], pa.list_(pa.string()))})
    path = parquet(tmp_path, table)
    parsed = parse_dataset(path, "parquet", "multilabel", "text", "tags")
    assert (parsed.label_names, parsed.labels) == (["a", "b"], [[0, 1], [], [1]])
    err = problem(path, "parquet", task="multilabel")
    assert (err.field, "'tags'" in err.detail) == ("label_column", True)


def test_parquet_binary_latin1_and_regression(tmp_path: Path) -> None:
    table = pa.table({"text": pa.array([b"ok", "caf\u00e9".encode("latin-1")], pa.binary()), "label": [1.0, 2.0]})
    err = problem(parquet(tmp_path, table), "parquet", task="regression")
    assert (err.title, err.field, err.row) == ("wrong encoding", "text_column", 2)
    table = pa.table({"text": ["x", "y"], "label": [1.0, float("inf")]})
    err = problem(parquet(tmp_path, table, "r.parquet"), "parquet", task="regression")
    assert (err.title, err.row) == ("unparsable label", 2)


def test_parquet_no_rows_duplicates_and_garbage(tmp_path: Path) -> None:
    empty = pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.string())})
    assert problem(parquet(tmp_path, empty), "parquet").title == "no rows"
    dup = pa.Table.from_arrays([pa.array(["x", "y"]), pa.array(["a", "b"]), pa.array(["a", "b"])],
                               names=["text", "label", "label"])
    assert problem(parquet(tmp_path, dup, "dup.parquet"), "parquet").title == "duplicate column names"
    err = problem(write(tmp_path, "bad.parquet", b"PAR1 not really"), "parquet")
    assert (err.status, err.title, err.field) == (422, "unreadable Parquet file", "file")


# ---- normalised storage -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("task, labels, arrow_type", [
    ("classification", [0, 1, 1], pa.int64()),
    ("multilabel", [[0, 1], [], [1]], pa.list_(pa.int64())),
    ("regression", [0.5, -1.0, 3.25], pa.float64()),
])
def test_normalized_round_trip(tmp_path: Path, task: str, labels: list[Any], arrow_type: pa.DataType) -> None:
    names = None if task == "regression" else ["a", "b"]
    parsed = ParsedDataset(["x", "y, \"z\"", "é"], labels, names, None, 3)
    dest = tmp_path / "data.parquet"
    write_normalized(parsed, task, dest)
    assert read_normalized(dest) == (parsed.examples, labels)
    schema = pq.read_schema(dest)
    assert schema.field("text").type == pa.string() and schema.field("label").type == arrow_type
    assert json.loads(schema.metadata[b"hubtune.label_names"]) == names
    assert [p.name for p in tmp_path.iterdir()] == ["data.parquet"]  # no temp file left


def test_csv_to_normalized_end_to_end(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", 'text,label\n"a, b",neg\nc,pos\n')
    parsed = parse_dataset(path, "csv", "classification", "text", "label")
    write_normalized(parsed, "classification", tmp_path / "n.parquet")
    assert read_normalized(tmp_path / "n.parquet") == (["a, b", "c"], [0, 1])


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    parsed = ParsedDataset(["x", "y"], ["not", "ints"], ["a", "b"], None, 2)
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        write_normalized(parsed, "classification", tmp_path / "data.parquet")
    assert list(tmp_path.iterdir()) == []


# ---- upload streaming ---------------------------------------------------------------------------------------------
def upload(data: bytes, name: str = "d.csv") -> UploadFile:
    return UploadFile(io.BytesIO(data), filename=name, headers=Headers({"content-type": "text/csv"}))


def test_stream_upload_size_and_sha256(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000 + b"tail"
    dest = tmp_path / "sub" / ".upload-1"
    size, digest = asyncio.run(stream_upload_to_disk(upload(data), dest, max_bytes=len(data), chunk_size=4096))
    assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    assert dest.read_bytes() == data


def test_stream_upload_over_cap_leaves_no_file(tmp_path: Path) -> None:
    dest = tmp_path / ".upload-2"
    with pytest.raises(DatasetProblem) as info:
        asyncio.run(stream_upload_to_disk(upload(b"x" * 10_001), dest, max_bytes=10_000, chunk_size=1000))
    assert (info.value.status, info.value.field) == (413, "file")
    assert not dest.exists()


def test_stream_upload_empty_is_422(tmp_path: Path) -> None:
    dest = tmp_path / ".upload-3"
    with pytest.raises(DatasetProblem) as info:
        asyncio.run(stream_upload_to_disk(upload(b""), dest, max_bytes=100))
    assert (info.value.status, info.value.title, info.value.field) == (422, "empty file", "file")
    assert not dest.exists()


# ---- text pairs -----------------------------------------------------------------------------------------------
def test_text_pairs_from_csv_jsonl_and_parquet_round_trip(tmp_path: Path) -> None:
    csv_path = write(tmp_path, "p.csv", 'premise,hypothesis,label\n"a man, asleep",a man sleeps,yes\n'
                                        "a dog runs,a cat sits,no\n")
    json_path = jsonl(tmp_path, [{"premise": "a man, asleep", "hypothesis": "a man sleeps", "label": "yes"},
                                 {"premise": "a dog runs", "hypothesis": "a cat sits", "label": "no"}])
    pq_path = parquet(tmp_path, pa.table({"premise": ["a man, asleep", "a dog runs"],
                                          "hypothesis": ["a man sleeps", "a cat sits"], "label": ["yes", "no"]}))
    for path, fmt in ((csv_path, "csv"), (json_path, "jsonl"), (pq_path, "parquet")):
        parsed = parse_dataset(path, fmt, "classification", "premise", "label", text_pair_column="hypothesis")
        assert parsed.examples == [("a man, asleep", "a man sleeps"), ("a dog runs", "a cat sits")], fmt
        assert parsed.labels == [1, 0] and parsed.label_names == ["no", "yes"]
        out = tmp_path / f"{fmt}.norm.parquet"
        write_normalized(parsed, "classification", out)
        assert read_normalized(out) == (parsed.examples, [1, 0])
        assert pq.read_schema(out).names == ["text", "text_pair", "label"]
    single = parse_dataset(csv_path, "csv", "classification", "premise", "label")  # the pair column is optional
    assert single.examples == ["a man, asleep", "a dog runs"]


def test_text_pair_errors_name_the_field_and_row(tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", "q,passage,label\nwho,he did,1\nwhen, ,0\n")
    blank = problem(path, "csv", text="q", text_pair_column="passage")
    assert (blank.title, blank.field, blank.row) == ("empty text", "text_pair_column", 2)
    unknown = problem(path, "csv", text="q", text_pair_column="answer")
    assert unknown.field == "text_pair_column" and "'passage'" in unknown.detail
    for column in ("q", "label"):
        same = problem(path, "csv", text="q", text_pair_column=column)
        assert same.field == "text_pair_column" and same.title == "same column twice"
    missing = problem(jsonl(tmp_path, [{"q": "who", "passage": "he", "label": 1}, {"q": "when", "label": 0}]),
                      "jsonl", text="q", text_pair_column="passage")
    assert (missing.title, missing.field, missing.row) == ("missing text", "text_pair_column", 2)
    images = problem(path, "zip", text="q", text_pair_column="passage")
    assert images.field == "text_pair_column"

"""LIFT's serialisation (service/lift.py): every row's sentence reads back into exactly its columns and cells, and
the upload rules (service/datasets.py) write a table's rows so, each refusal naming the field and row."""

from __future__ import annotations

import datetime
import decimal
import json
import math
import random
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.datasets import DatasetProblem, feature_column_names, parse_dataset, read_normalized, write_normalized
from service.lift import MAX_FEATURE_COLUMNS, MAX_SENTENCE_CHARS, Single, cell_text, parse_sentence, row_sentence
from service.tabular import UploadLimits

# The first three rows of UCI Adult (adult.data), as the file has them, with its column names.
ADULT_COLUMNS = ["age", "workclass", "fnlwgt", "education", "education-num", "marital-status", "occupation",
                 "relationship", "race", "sex", "capital-gain", "capital-loss", "hours-per-week", "native-country"]
ADULT_ROWS = [
    "39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White, Male, 2174, 0, 40, "
    "United-States",
    "50, Self-emp-not-inc, 83311, Bachelors, 13, Married-civ-spouse, Exec-managerial, Husband, White, Male, 0, 0, "
    "13, United-States",
    "38, Private, 215646, HS-grad, 9, Divorced, Handlers-cleaners, Not-in-family, White, Male, 0, 0, 40, "
    "United-States",
]


def adult_rows() -> list[list[str]]:
    return [row.split(", ") for row in ADULT_ROWS]


def test_adult_rows_read_as_lifts_template_and_back():
    sentence = row_sentence(ADULT_COLUMNS, adult_rows()[0])
    assert sentence.startswith("age is 39, workclass is State-gov, fnlwgt is 77516, education is Bachelors, ")
    assert sentence.endswith("hours-per-week is 40, native-country is United-States")
    for row in adult_rows():
        assert parse_sentence(row_sentence(ADULT_COLUMNS, row)) == list(zip(ADULT_COLUMNS, row))


def test_separators_and_quotes_inside_names_and_values_round_trip():
    columns = ["city", "note", "what is", "x is y", '"quoted"', "a, b", "said"]
    cells = ["Cambridge, MA", "1 is 2", "fast", "slow, cheap", '"as is"', "a,", 'he said "hi", twice']
    sentence = row_sentence(columns, cells)
    # quoted only where the plain text would not read back; doubled quotes inside
    assert sentence == ('city is "Cambridge, MA", note is 1 is 2, "what is" is fast, "x is y" is "slow, cheap", '
                        '"""quoted""" is """as is""", a, b is a,, said is "he said ""hi"", twice"')
    assert parse_sentence(sentence) == list(zip(columns, cells))


def test_random_rows_of_separator_fragments_round_trip():
    """Names and cells built from the pieces the template is made of: every row reads back exactly."""
    pieces = ['"', ",", " ", "is", "i", "s", ", ", " is ", "a", '""']
    rng = random.Random(0)
    for _ in range(3000):
        width = rng.randint(1, 5)
        columns = list(dict.fromkeys("".join(rng.choices(pieces, k=rng.randint(0, 5))) for _ in range(width)))
        cells = ["".join(rng.choices(pieces, k=rng.randint(1, 5))) for _ in columns]
        present = [c if rng.random() > 0.2 else None for c in cells]
        sentence = row_sentence(columns, present)
        assert parse_sentence(sentence) == [(n, c) for n, c in zip(columns, present) if c is not None], sentence


def test_missing_cells_are_left_out_and_read_back_as_absent():
    assert row_sentence(["a", "b", "c"], ["1", None, "3"]) == "a is 1, c is 3"
    assert row_sentence(["a"], [None]) == ""
    assert parse_sentence("") == []
    for value in (None, float("nan"), "", "   ", decimal.Decimal("NaN")):
        assert cell_text(value) is None


@pytest.mark.parametrize("bad", ["a is", "a is 1, ", 'a is "1', "a is 1; b is 2, c", 'a is "1"x'])
def test_sentences_no_row_could_have_written_are_refused(bad):
    with pytest.raises(ValueError):
        parse_sentence(bad)


def test_numbers_are_written_shortest_and_read_back_equal():
    assert [cell_text(v) for v in (39, True, False, 39.0, -0.0, 0.1, 1e-05, 1e20, 2.5e15, float("inf"))] == [
        "39", "true", "false", "39", "0", "0.1", "1e-05", "1e+20", "2500000000000000", "inf"]
    rng = random.Random(1)
    for _ in range(5000):
        value = struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0]
        if math.isfinite(value):
            assert float(cell_text(value)) == value
        single = struct.unpack("<f", struct.pack("<I", rng.getrandbits(32)))[0]
        if math.isfinite(single):
            text = cell_text(Single(single))
            assert struct.unpack("<f", struct.pack("<f", float(text)))[0] == single
            assert len(text.lstrip("-").split("e")[0].replace(".", "").strip("0")) <= 9  # significant digits
    assert cell_text(Single(0.10000000149011612)) == "0.1"  # float32(0.1) widened: not its double's digits
    assert [cell_text(Single(v)) for v in (39.0, 16777216.0, 3e9)] == ["39", "16777216", "3e+09"]


def test_strings_dates_and_decimals_keep_their_text_and_lists_are_refused():
    assert cell_text("  0.10 ") == "0.10" and cell_text("02139") == "02139"
    assert cell_text(decimal.Decimal("1.50")) == "1.50"
    assert cell_text(datetime.date(2024, 2, 29)) == "2024-02-29"
    assert cell_text(datetime.datetime(2024, 2, 29, 13, 5)) == "2024-02-29T13:05:00"
    for bad in ([1, 2], {"a": 1}, b"x"):
        with pytest.raises(ValueError):
            cell_text(bad)


def test_sklearn_tables_round_trip_every_cell():
    datasets = pytest.importorskip("sklearn.datasets")
    for bunch in (datasets.load_wine(), datasets.load_breast_cancer(), datasets.load_diabetes(scaled=False)):
        names = [str(n) for n in bunch.feature_names]
        for row in bunch.data:
            cells = [float(v) for v in row]
            pairs = parse_sentence(row_sentence(names, [cell_text(v) for v in cells]))
            assert [n for n, _ in pairs] == names and [float(t) for _, t in pairs] == cells


# ---- the upload rules ------------------------------------------------------------------------------------------
def write_adult_csv(tmp_path: Path) -> Path:
    lines = [",".join(ADULT_COLUMNS + ["income", "address"])]
    for row, income, address in zip(adult_rows(), ["<=50K", "<=50K", ">50K"], ["Boston, MA", "", "x is y"]):
        lines.append(",".join(row + [income, f'"{address}"']))
    path = tmp_path / "adult.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_csv_table_becomes_sentences_that_read_back(tmp_path):
    path = write_adult_csv(tmp_path)
    columns = ["age", "education", "address", "hours-per-week"]
    parsed = parse_dataset(path, "csv", "classification", "", "income", feature_columns=columns)
    assert parsed.examples == [
        'age is 39, education is Bachelors, address is "Boston, MA", hours-per-week is 40',
        "age is 50, education is Bachelors, hours-per-week is 13",  # a blank cell is missing: left out
        "age is 38, education is HS-grad, address is x is y, hours-per-week is 40",
    ]
    assert parsed.label_names == ["<=50K", ">50K"] and parsed.labels == [0, 0, 1]
    assert parsed.serialization == {"method": "lift", "feature_columns": columns, "examples": parsed.examples}
    assert dict(parse_sentence(parsed.examples[0]))["address"] == "Boston, MA"
    write_normalized(parsed, "classification", tmp_path / "n.parquet")
    assert read_normalized(tmp_path / "n.parquet") == (parsed.examples, [0, 0, 1])


def test_jsonl_and_parquet_tables_write_numbers_by_their_type(tmp_path):
    rows = [{"x": 0.1, "n": 3, "flag": True, "kind": "a", "y": 1.5}, {"x": 2.0, "n": None, "kind": "b", "y": 2.5}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parsed = parse_dataset(path, "jsonl", "regression", "", "y", feature_columns=["x", "n", "flag", "kind"])
    assert parsed.examples == ["x is 0.1, n is 3, flag is true, kind is a", "x is 2, kind is b"]
    table = pa.table({"x": pa.array([0.1, float("nan"), 7.25], pa.float32()), "n": [1, 2, 3],
                      "d": pa.array([decimal.Decimal("1.50")] * 3, pa.decimal128(5, 2)), "y": [1.0, 2.0, 3.0]})
    pq.write_table(table, tmp_path / "t.parquet")
    parsed = parse_dataset(tmp_path / "t.parquet", "parquet", "regression", "", "y", feature_columns=["x", "n", "d"])
    assert parsed.examples == ["x is 0.1, n is 1, d is 1.50", "n is 2, d is 1.50", "x is 7.25, n is 3, d is 1.50"]


def refusal(call, field: str, row: int | None = None) -> DatasetProblem:
    with pytest.raises(DatasetProblem) as info:
        call()
    assert info.value.status == 422 and info.value.field == field and info.value.row == row, info.value
    return info.value


def test_bad_feature_columns_are_refused_naming_the_field(tmp_path):
    path = write_adult_csv(tmp_path)

    def parse(columns, label="income", fmt="csv", file=path):
        return lambda: parse_dataset(file, fmt, "classification", "", label, feature_columns=columns)

    assert "'salary'" in refusal(parse(["age", "salary"]), "feature_columns").detail
    assert "label" in refusal(parse(["age", "income"]), "feature_columns").title
    refusal(lambda: feature_column_names("age,,sex"), "feature_columns")
    refusal(lambda: feature_column_names("age, sex, age"), "feature_columns")
    assert feature_column_names(' age , sex ') == ["age", "sex"]
    assert feature_column_names('["a, b", "c"]') == ["a, b", "c"]
    refusal(lambda: feature_column_names('["a", 1]'), "feature_columns")
    too_many = refusal(lambda: feature_column_names(",".join(f"c{i}" for i in range(MAX_FEATURE_COLUMNS + 1))),
                       "feature_columns")
    assert too_many.limit_value == MAX_FEATURE_COLUMNS
    refusal(lambda: parse_dataset(path, "csv", "classification", "", "income", text_pair_column="sex",
                                  feature_columns=["age"]), "text_pair_column")
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"a": 1, "b": 2, "y": "p"}\n{"b": null, "y": "q"}\n{"a": [1], "y": "p"}\n')
    assert "no value" in refusal(parse(["a", "b"], "y", "jsonl", jsonl), "feature_columns", row=2).detail
    jsonl.write_text('{"a": 1, "y": "p"}\n{"a": [1], "y": "q"}\n')
    refusal(parse(["a"], "y", "jsonl", jsonl), "feature_columns", row=2)


def test_sentence_bounds_name_the_row_and_the_limit(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("a,y\n1,p\n" + "x" * MAX_SENTENCE_CHARS + ",q\n")
    long = refusal(lambda: parse_dataset(path, "csv", "classification", "", "y", feature_columns=["a"]),
                   "feature_columns", row=2)
    assert long.limit_value == MAX_SENTENCE_CHARS
    path.write_text("a,y\n" + "".join(f"{i},{'pq'[i % 2]}\n" for i in range(100)))
    total = refusal(lambda: parse_dataset(path, "csv", "classification", "", "y", feature_columns=["a"],
                                          limits=UploadLimits(max_upload_bytes=300)), "feature_columns", row=45)
    assert total.limit == "HUBTUNE_MAX_UPLOAD_BYTES"

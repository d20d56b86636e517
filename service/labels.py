"""Labels parsed and encoded for a task, by the upload rules of service.datasets (classification, multilabel,
regression): shared by text and image datasets. Torch-free."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from service.tabular import MISSING, DatasetProblem, check_unicode, show

MULTILABEL_SEPARATORS = ("|", ";", ",")

_INT_RE = re.compile(r"[+-]?\d+")
# Regression targets are standardised (mean, variance) in float64; below this their squares and sums cannot
# overflow, and the differences between them stay representable.
MAX_REGRESSION_TARGET = 1e15


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
    # a table written as sentences (service.lift): {"method": "lift", "feature_columns": [...], "examples": [...]}
    serialization: dict[str, Any] | None = None


def check_row_count(rows: int, min_rows: int) -> None:
    """A DatasetProblem for a dataset with no rows or fewer than min_rows."""
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


def _missing_label(value: Any) -> bool:
    return value is MISSING or value is None or (isinstance(value, str) and not value.strip())


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
    raise DatasetProblem(422, "unparsable label", f"row {row}: {show(value)} in {column!r} is not a class name "
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
    raise DatasetProblem(422, "unparsable label", f"row {row}: list element {show(value)} in {column!r} is not a "
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
            items = _json_list(text, row, column)
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


def _json_list(text: str, row: int, column: str) -> Any:
    """A label cell starting with "[" read as JSON; the row named for one that is not JSON or not Unicode text."""
    try:
        items = json.loads(text)
    except RecursionError as exc:
        raise DatasetProblem(422, "unparsable label", f"row {row}: {column!r} starts with '[' but is nested too "
                             "deeply", field="label_column", row=row) from exc
    except ValueError as exc:
        raise DatasetProblem(422, "unparsable label", f"row {row}: {column!r} starts with '[' but is not a "
                             f"JSON list ({getattr(exc, 'msg', exc)})", field="label_column", row=row) from exc
    check_unicode(items, f"row {row}", field="label_column", row=row)
    return items


def _number_label(value: Any, row: int, column: str) -> float:
    if _missing_label(value):
        _raise_missing_label(row, column)
    number = _as_float(value)
    if number is None or math.isnan(number) or (math.isinf(number) and not _too_large(value)):
        raise DatasetProblem(422, "unparsable label", f"row {row}: {show(value)} in {column!r} is not a finite "
                             "number", field="label_column", row=row)
    if abs(number) >= MAX_REGRESSION_TARGET:
        raise DatasetProblem(422, "label out of range", f"row {row}: {show(value)} in {column!r} is too large; "
                             f"regression targets must be below {MAX_REGRESSION_TARGET:g} in magnitude (rescale "
                             "them)", field="label_column", row=row)
    return number


def _as_float(value: Any) -> float | None:
    """A label cell as a float (infinite for a number beyond a float's range); None if it is not a number."""
    try:
        if isinstance(value, str):
            return float(value.strip())
        if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
            return float(value)
    except ValueError:
        return None
    except OverflowError:  # an integer beyond a float's range (a JSON number of 400 digits)
        return math.inf
    return None


def _too_large(value: Any) -> bool:
    """Whether an infinite float came from a finite number too large for a float, not from inf itself."""
    if isinstance(value, str):
        return value.strip().lstrip("+-").lower() not in ("inf", "infinity")
    return isinstance(value, int) or (isinstance(value, Decimal) and value.is_finite())


def _sort_names(names: set[str]) -> list[str]:
    if names and all(_INT_RE.fullmatch(n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))  # "2" before "10"
    return sorted(names)


def _need_two_classes(label_names: list[str], column: str) -> None:
    if len(label_names) < 2:
        found = repr(label_names[0]) if label_names else "none"
        raise DatasetProblem(422, "a single class", f"{column!r} has one class ({found}); at least two are needed",
                             field="label_column")

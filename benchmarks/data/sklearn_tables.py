"""Write scikit-learn's built-in tables as text CSVs, one sentence per row in LIFT's template.

LIFT (Dinh et al., NeurIPS 2022) fine-tunes language models on tabular data by writing each row as a sentence:
"age is 59, sex is 2, bmi is 32.1, ...". The tables ship inside scikit-learn (no download):

- `diabetes`: 442 patients, 10 baseline variables (unscaled), target = disease progression one year later
  (regression);
- `breast_cancer`: 569 tumours, 30 measurements, target = malignant / benign (classification).

    pip install scikit-learn
    python -m benchmarks.data.sklearn_tables --table diabetes --out /tmp/tab/diabetes.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

TABLES = ("diabetes", "breast_cancer")


def serialise_row(names: list[str], values: list[float]) -> str:
    """One row as LIFT's sentence: "name is value, ..." with values at 4 significant digits."""
    return ", ".join(f"{name} is {value:.4g}" for name, value in zip(names, values, strict=True))


def write_table_csv(table: str, out: Path) -> int:
    try:
        from sklearn import datasets
    except ImportError as exc:
        raise SystemExit("scikit-learn is not installed: pip install scikit-learn") from exc
    if table == "diabetes":
        bunch = datasets.load_diabetes(scaled=False)
        labels = [f"{v:g}" for v in bunch.target]
    elif table == "breast_cancer":
        bunch = datasets.load_breast_cancer()
        labels = [str(bunch.target_names[v]) for v in bunch.target]
    else:
        raise SystemExit(f"unknown table {table!r}: one of {TABLES}")
    names = [str(n) for n in bunch.feature_names]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows((serialise_row(names, list(row)), label) for row, label in zip(bunch.data, labels))
    return len(labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", choices=TABLES, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = write_table_csv(args.table, args.out)
    print(f"wrote {args.out}: {rows} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

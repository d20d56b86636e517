"""Write the Jane Austen benchmark CSVs: which novel a line comes from (6 classes), and a regression target.

A hard, real text task on which LogME's Occam failure is plain at a few hundred rows (benchmarks/occam.py). The
novels come from Debian's r-cran-janeaustenr (an R lazy-load database; see ../shared/OFFLINE_MODELS.md), read
without R by the PyPI package rdata:

    apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb /tmp/austen/pkg
    pip install rdata
    python -m benchmarks.data.austen --package /tmp/austen/pkg --out /tmp/austen/austen.csv \\
        --regression-out /tmp/austen/austen_reg.csv

austen.csv: `--rows` lines of at least six words, drawn from all six novels in random order (random.Random(seed)),
columns text,label (label = the novel). austen_reg.csv: the first `--regression-rows` of those lines with
y = log(number of characters), a regression target whose mean (about 4.2) is far from zero.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import lzma
import math
import random
import zlib
from collections import Counter
from pathlib import Path

BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")


def _inflate(blob: bytes) -> bytes:
    """One object of an R lazy-load database: 4-byte length, then a compression tag (R >= 2.10) or zlib."""
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    tag = blob[4:5]
    if tag == b"X":
        return lzma.decompress(blob[5:])
    if tag == b"2":
        return bz2.decompress(blob[5:])
    if tag == b"Z":
        return zlib.decompress(blob[5:])
    if tag == b"0":
        return blob[5:]
    return zlib.decompress(blob[4:])


def read_novels(package: Path) -> dict[str, list[str]]:
    try:
        import rdata
    except ImportError as exc:
        raise SystemExit("rdata is not installed: pip install rdata") from exc
    base = next(package.rglob("janeaustenr/data/Rdata.rdx"), None)
    if base is None:
        raise SystemExit(f"no janeaustenr/data/Rdata.rdx under {package}: extract r-cran-janeaustenr there")
    index = rdata.conversion.convert(rdata.parser.parse_data(_inflate(base.read_bytes())))
    database = base.with_suffix(".rdb").read_bytes()
    novels = {}
    for name, (offset, length) in index["variables"].items():
        if str(name) in BOOKS:
            obj = rdata.parser.parse_data(_inflate(database[int(offset): int(offset) + int(length)]))
            novels[str(name)] = [str(line) for line in rdata.conversion.convert(obj)]
    return novels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, required=True, help="folder r-cran-janeaustenr was extracted into")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--regression-out", type=Path)
    parser.add_argument("--regression-rows", type=int, default=600)
    args = parser.parse_args()

    novels = read_novels(args.package)
    rows = [(line.strip(), book) for book, lines in novels.items() for line in lines if len(line.split()) >= 6]
    random.Random(args.seed).shuffle(rows)
    rows = rows[: args.rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    print(f"wrote {args.out}: {len(rows)} rows, {dict(Counter(book for _, book in rows))}")
    if args.regression_out:
        with args.regression_out.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "y"])
            writer.writerows((line, round(math.log(len(line)), 4)) for line, _ in rows[: args.regression_rows])
        print(f"wrote {args.regression_out}: {min(args.regression_rows, len(rows))} rows, y = log(characters)")


if __name__ == "__main__":
    main()

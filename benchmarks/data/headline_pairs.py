"""A real text-pair task from BBC News: does this headline belong to this article?

Each BBC file's first line is its headline and the rest its article. Half the rows pair an article with its own
headline ("match"); the other half with the headline of another article of the same topic ("other"), so the topic
alone cannot tell them apart: the model has to match what the headline says to what the article says (a claim-
matching / QNLI-like pair task). Written as JSONL with columns headline, article, label, for
`--text-column headline --text-pair-column article` (rank_vs_finetune, or an upload with text_pair_column).

    python -m benchmarks.data.headline_pairs --out /tmp/pairs/headlines.jsonl --rows 600
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def headline_articles() -> list[tuple[str, str, str]]:
    """(headline, article, topic) of every BBC News file whose headline and article are both non-blank."""
    from demo.prepare_hub import bbc_files

    items = []
    for text, topic in bbc_files():
        headline, _, article = text.strip().partition("\n")
        headline, article = " ".join(headline.split()), " ".join(article.split())
        if headline and article:
            items.append((headline, article, topic))
    return items


def headline_pairs(rows: int, seed: int = 0) -> list[dict[str, str]]:
    """`rows` rows, half matched and half paired with a same-topic headline of another article (distinct
    headlines: BBC repeats some articles, and a copy's headline would be a match labelled "other")."""
    items = headline_articles()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(items))[:rows]
    by_topic: dict[str, list[int]] = {}
    for i, (_, _, topic) in enumerate(items):
        by_topic.setdefault(topic, []).append(i)
    out = []
    for k, i in enumerate(order):
        headline, article, topic = items[i]
        label = "match"
        if k % 2:
            others = [j for j in by_topic[topic] if items[j][0] != headline]
            headline, label = items[others[rng.integers(len(others))]][0], "other"
        out.append({"headline": headline, "article": article, "label": label, "topic": topic})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = headline_pairs(args.rows, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, args.out)
    matched = sum(r["label"] == "match" for r in rows)
    print(f"[headline_pairs] {len(rows)} rows ({matched} match, {len(rows) - matched} other) -> {args.out}")


if __name__ == "__main__":
    main()

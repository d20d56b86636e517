"""Text augmentation that needs no other model and no network: EDA's operations without synonyms (Wei & Zou,
EMNLP 2019, jasonwei20/eda_nlp; grouped with the other rule-based methods in Bayer et al.'s survey of text data
augmentation). Pure functions over whitespace tokens and a numpy Generator; no torch.

    swap    n random swaps of two tokens                            n = max(1, int(p * len)), 0 when p = 0
    delete  each token dropped with probability p (at least one is kept)
    insert  n tokens inserted at random positions, drawn from the training rows' tokens by their frequency (EDA
            inserts a synonym of a word of the sentence; without a thesaurus, a word of the corpus)
    eda     one of the three above, chosen per row at random

The training loop re-augments the training rows every epoch (`augment_rows` with the epoch number), so an epoch
sees each row once, changed afresh; validation rows are never augmented. The same (seed, epoch) gives the same rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

OPERATIONS = ("swap", "delete", "insert")


@dataclass(frozen=True)
class Vocabulary:
    """The training rows' tokens with their counts, for frequency-weighted insertion."""

    words: tuple[str, ...]
    cumulative: np.ndarray  # cumulative counts, for a draw by binary search

    @classmethod
    def of(cls, texts: Sequence[str | tuple[str, ...]]) -> Vocabulary:
        counts: Counter[str] = Counter()
        for text in texts:
            for part in (text if isinstance(text, tuple) else (text,)):
                counts.update(part.split())
        words = tuple(sorted(counts))
        return cls(words, np.cumsum([counts[w] for w in words], dtype=np.int64))

    def draw(self, rng: np.random.Generator) -> str | None:
        if not self.words:
            return None
        at = int(rng.integers(int(self.cumulative[-1])))
        return self.words[int(np.searchsorted(self.cumulative, at, side="right"))]


def _count(p: float, length: int) -> int:
    return 0 if p <= 0 or length == 0 else max(1, int(p * length))


def random_swap(tokens: list[str], p: float, rng: np.random.Generator) -> list[str]:
    out = list(tokens)
    if len(out) < 2:
        return out
    for _ in range(_count(p, len(out))):
        i, j = rng.choice(len(out), size=2, replace=False)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(tokens: list[str], p: float, rng: np.random.Generator) -> list[str]:
    if len(tokens) <= 1 or p <= 0:
        return list(tokens)
    keep = rng.random(len(tokens)) >= p
    if not keep.any():  # EDA keeps one random token rather than an empty text
        return [tokens[int(rng.integers(len(tokens)))]]
    return [t for t, k in zip(tokens, keep, strict=True) if k]


def random_insertion(tokens: list[str], p: float, rng: np.random.Generator, vocabulary: Vocabulary) -> list[str]:
    out = list(tokens)
    for _ in range(_count(p, len(tokens))):
        word = vocabulary.draw(rng)
        if word is None:
            break
        out.insert(int(rng.integers(len(out) + 1)), word)
    return out


def augment_tokens(tokens: list[str], name: str, p: float, rng: np.random.Generator,
                   vocabulary: Vocabulary) -> list[str]:
    if name == "eda":
        name = OPERATIONS[int(rng.integers(len(OPERATIONS)))]
    if name == "swap":
        return random_swap(tokens, p, rng)
    if name == "delete":
        return random_deletion(tokens, p, rng)
    if name == "insert":
        return random_insertion(tokens, p, rng, vocabulary)
    raise ValueError(f"augment.name: unknown augmentation {name!r}")


def augment_text(text: str, name: str, p: float, rng: np.random.Generator, vocabulary: Vocabulary) -> str:
    """The text with its whitespace tokens augmented; the text itself (spacing kept) when nothing changed."""
    tokens = text.split()
    out = augment_tokens(tokens, name, p, rng, vocabulary)
    return text if out == tokens else " ".join(out)


def augment_rows(rows: Sequence[str | tuple[str, ...]], name: str, p: float, seed: int, epoch: int,
                 vocabulary: Vocabulary | None = None) -> list[str | tuple[str, ...]]:
    """Every row augmented with a generator seeded by (seed, epoch); a text pair's texts each on their own.
    p = 0 returns the rows unchanged."""
    if p <= 0:
        return list(rows)
    vocabulary = vocabulary if vocabulary is not None else Vocabulary.of(rows)
    rng = np.random.default_rng([int(seed), int(epoch), 0xA06])
    out: list[str | tuple[str, ...]] = []
    for row in rows:
        if isinstance(row, tuple):
            out.append(tuple(augment_text(part, name, p, rng, vocabulary) for part in row))
        else:
            out.append(augment_text(row, name, p, rng, vocabulary))
    return out

"""LIFT (Dinh et al., NeurIPS 2022, "Language-Interfaced Fine-Tuning for Non-Language Machine Learning Tasks"): a
table's row written as one sentence, so that language models rank and tune on it as on any text.

    age is 39, workclass is State-gov, hours-per-week is 40

The template: `<column> is <value>` for each feature column in the order the user gave, joined by ", ".

How a cell is written (`cell_text`; None means missing):
- strings: stripped of surrounding whitespace, otherwise verbatim (a CSV cell, numbers included, is its text as
  written in the file: "0.10" stays "0.10", "02139" stays "02139"); blank is missing.
- integers: decimal digits. Booleans: "true" / "false".
- floats (JSON numbers, Parquet doubles): the shortest decimal that reads back as the same double (Python's repr:
  0.1 -> "0.1", 1e-05 -> "1e-05"), with an integral value below 1e16 written without ".0" (39.0 -> "39", and -0.0
  -> "0"). Parquet float32 / float16 columns: the fewest significant digits that read back as the same 32-bit float
  (float32(0.1) -> "0.1", not "0.10000000149011612"; 16777216 -> "16777216", 3e9 -> "3e+09"). NaN is missing;
  infinities are "inf" / "-inf".
- decimals: their exact text ("1.50"); dates and times: ISO 8601. Lists, maps and bytes are no cells (ValueError).

Missing cells (absent, null, NaN, blank) are left out of the sentence, name and all: a sentence names the columns
it has, so leaving one out reads back unambiguously as missing.

Quoting, so that every sentence reads back (`parse_sentence`) into exactly its (column, value) pairs: the reader
ends a plain name at the first " is " and a plain value at the first ", ", so a name is written in double quotes
when it contains " is " or ends with " is", a value when it contains ", ", and either one when it starts with a
double quote. Inside quotes a double quote is doubled, as in CSV: `note is "fast, cheap"`, `"x is y" is 3`,
`said is "he said ""hi"", twice"`. Anything else is written as it is (a value "1 is 2", a name "a, b").

Pure functions of the standard library: the API writes the sentences, a benchmark or a user's predict code can
write them the same way.
"""

from __future__ import annotations

import datetime
import decimal
import math
import struct
from collections.abc import Sequence
from typing import Any

IS = " is "
SEPARATOR = ", "
QUOTE = '"'
TEMPLATE = "<column> is <value>, <column> is <value>, ..."
MAX_FEATURE_COLUMNS = 100  # a sentence of more is cut by every model's max_length (128 tokens by default) anyway
MAX_SENTENCE_CHARS = 4096  # one row's sentence: ~1000 tokens, twice what BERT-like models read
EXAMPLES_SHOWN = 3  # sentences the dataset's response shows


class Single(float):
    """A float read from a 32-bit (or 16-bit) column: written with the fewest digits that read back as that
    32-bit value, not the double it widens to."""


def cell_text(value: Any) -> str | None:
    """A cell as the sentence writes it (module rules); None for a missing cell; ValueError for a list, map or
    bytes, which are no cell of a table."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float_text(value)
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, decimal.Decimal):
        return None if value.is_nan() else str(value)
    if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
        return value.isoformat()
    raise ValueError(f"a {type(value).__name__} is not a table cell (numbers, strings, booleans, dates)")


def _float_text(value: float) -> str | None:
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"  # -0.0 too
    if isinstance(value, Single):
        for digits in range(1, 10):  # 9 significant digits always read back a float32
            text = f"{value:.{digits}g}"
            if _as_float32(float(text)) == _as_float32(value):
                return text
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(float(value))


def _as_float32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


def row_sentence(columns: Sequence[str], texts: Sequence[str | None]) -> str:
    """The sentence of one row: `<column> is <value>` per present cell (texts from `cell_text`; None: missing, left
    out), in the order given, joined by ", "; "" when every cell is missing."""
    if len(columns) != len(texts):
        raise ValueError(f"{len(columns)} columns but {len(texts)} cells")
    return SEPARATOR.join(f"{_quoted(name, IS)}{IS}{_quoted(text, SEPARATOR)}"
                          for name, text in zip(columns, texts) if text is not None)


def parse_sentence(sentence: str) -> list[tuple[str, str]]:
    """The (column, value) pairs of a sentence `row_sentence` wrote, in order; ValueError for one it cannot have
    written. Columns absent from the result were missing."""
    pairs: list[tuple[str, str]] = []
    at = 0
    while at < len(sentence):
        name, at = _read(sentence, at, IS)
        if not sentence.startswith(IS, at):
            raise ValueError(f"expected {IS!r} after column {name!r} at character {at}")
        value, at = _read(sentence, at + len(IS), SEPARATOR)
        pairs.append((name, value))
        if at < len(sentence):
            if not sentence.startswith(SEPARATOR, at):
                raise ValueError(f"expected {SEPARATOR!r} after the value of {name!r} at character {at}")
            at += len(SEPARATOR)
            if at == len(sentence):
                raise ValueError("the sentence ends with a separator")
    return pairs


def _needs_quotes(text: str, stop: str) -> bool:
    """Whether the plain text would not read back: the reader ends it at the first `stop`, which must be the one
    that follows it; and a leading quote would open a quoted one."""
    return text.startswith(QUOTE) or (text + stop).find(stop) != len(text)


def _quoted(text: str, stop: str) -> str:
    if not _needs_quotes(text, stop):
        return text
    return QUOTE + text.replace(QUOTE, QUOTE * 2) + QUOTE


def _read(sentence: str, at: int, stop: str) -> tuple[str, int]:
    """A name or value starting at `at`: quoted (doubled quotes inside), or plain up to the next `stop` or the end;
    returns it and where it ends."""
    if not sentence.startswith(QUOTE, at):
        end = sentence.find(stop, at)
        end = len(sentence) if end < 0 else end
        return sentence[at:end], end
    parts: list[str] = []
    at += 1
    while True:
        close = sentence.find(QUOTE, at)
        if close < 0:
            raise ValueError("a quote is not closed")
        parts.append(sentence[at:close])
        if not sentence.startswith(QUOTE * 2, close):
            return "".join(parts), close + 1
        parts.append(QUOTE)
        at = close + 2

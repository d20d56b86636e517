"""The strings a request may hold: no NUL character (PostgreSQL's text cannot store one) and no lone UTF-16
surrogate (a JSON escape such as "\\ud800" that no UTF-8 encoder accepts), each within the length of the column it
is stored in. Shared by every request model (RequestModel), the path ids and the form fields of the API.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

# The length of every id column (uuid4 hex) in service.db; a longer id cannot name anything.
ID_LENGTH = 32


def text_error(value: str, nul: bool = True) -> str | None:
    """Why `value` cannot be stored as text, or None; with nul=False only a lone surrogate counts."""
    if nul and "\x00" in value:
        return f"contains a NUL character at position {value.index(chr(0))}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains a lone surrogate (U+{ord(value[exc.start]):04X}) at position {exc.start}; not Unicode text"
    return None


def checked_text(value: str) -> str:
    """`value` unchanged, or a ValueError saying why it cannot be stored (pydantic renders it as a 422)."""
    error = text_error(value)
    if error:
        raise ValueError(error)
    return value


def first_text_error(value: Any, nul: bool = True) -> tuple[str, str] | None:
    """(where, why) of the first string anywhere in `value` (lists, dicts and their keys) that cannot be stored,
    or None; `where` is "" for value itself, else e.g. "[2]" or ".name.lr". Iterative: a deeply nested body cannot
    exhaust the stack."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            error = text_error(item, nul)
            if error:
                return where, error
        elif isinstance(item, dict):
            for key in item:
                key_error = text_error(key, nul) if isinstance(key, str) else None
                if key_error:  # named by position only: the key itself may not be printable
                    return where, f"has a key that {key_error}"
            stack.extend((f"{where}.{key}", child) for key, child in reversed(item.items()))
        elif isinstance(item, (list, tuple)):
            stack.extend((f"{where}[{i}]", item[i]) for i in reversed(range(len(item))))
    return None


class RequestModel(BaseModel):
    """A request body: unknown fields are refused, and so is any string in it that cannot be stored. Checked after
    each field's own validation: a nested RequestModel has checked its fields already, and names them."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _storable_text(cls, value: Any) -> Any:
        found = first_text_error(value)
        if found:
            where, why = found
            raise ValueError(f"{where.lstrip('.')} {why}" if where else why)
        return value

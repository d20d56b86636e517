"""Limit/offset pages of a query."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Query
from sqlalchemy import Select, func, select

from service.schemas import Page

PageT = TypeVar("PageT", bound=Page)

# The largest offset a list takes: beyond a signed 64-bit integer both databases fail, and no list is this long.
MAX_OFFSET = 2**31 - 1
OffsetQuery = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="items to skip")]


def paginate(session: Any, query: Select, limit: int, offset: int, render: Callable[[Any], Any],
             page: type[PageT], render_all: Callable[[list[Any]], list[Any]] | None = None) -> PageT:
    """The page of `query` at `offset`, each row rendered; `page` is the response model, e.g. Page[DatasetOut].
    render_all, if given, renders the page's rows at once instead (one query for what they all need)."""
    total = session.execute(select(func.count()).select_from(query.subquery())).scalar_one()
    rows = session.execute(query.limit(limit).offset(offset)).scalars().all()
    items = render_all(list(rows)) if render_all is not None else [render(r) for r in rows]
    return page(items=items, total=total, limit=limit, offset=offset,
                next_offset=offset + limit if offset + limit < total else None)

"""Limit/offset pages of a query."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Select, func, select

from service.schemas import Page

PageT = TypeVar("PageT", bound=Page)


def paginate(session: Any, query: Select, limit: int, offset: int, render: Callable[[Any], Any],
             page: type[PageT]) -> PageT:
    """The page of `query` at `offset`, each row rendered; `page` is the response model, e.g. Page[DatasetOut]."""
    total = session.execute(select(func.count()).select_from(query.subquery())).scalar_one()
    rows = session.execute(query.limit(limit).offset(offset)).scalars().all()
    return page(items=[render(r) for r in rows], total=total, limit=limit, offset=offset,
                next_offset=offset + limit if offset + limit < total else None)

"""Cursor paging by public id (ids sort in creation order), newest first unless asked otherwise."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

Order = Literal["asc", "desc"]
T = TypeVar("T")


def page(
    *, session: Session, stmt: Select[tuple[T]], id_column: InstrumentedAttribute[Any],
    after: str | None, limit: int, order: Order = "desc",
) -> tuple[list[T], bool]:
    """One page of rows after the cursor id, and whether more follow."""
    if after is not None:
        stmt = stmt.where(id_column < after if order == "desc" else id_column > after)
    stmt = stmt.order_by(id_column.desc() if order == "desc" else id_column.asc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    return rows[:limit], len(rows) > limit

"""Engine and session factory for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from coordinator.settings import CoordinatorSettings


def ensure_sqlite_dir(url: str) -> None:
    """SQLite creates the file but not its folder."""
    if url.startswith("sqlite") and "///" in url:
        database = url.split("///", 1)[1]
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)


def make_engine(settings: CoordinatorSettings) -> Engine:
    url = settings.resolved_database_url
    pool_size, max_overflow = settings.connections
    if url.startswith("sqlite"):
        ensure_sqlite_dir(url)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": settings.db_timeout_s},
            pool_size=pool_size, max_overflow=max_overflow, pool_timeout=settings.db_timeout_s,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the one writer
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=settings.db_timeout_s,
        pool_pre_ping=True,
        connect_args={"connect_timeout": int(settings.db_timeout_s)},
    )


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)

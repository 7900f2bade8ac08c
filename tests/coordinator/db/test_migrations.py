"""Alembic owns the schema: migrations build exactly the models, on both backends, and walk down and up."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from coordinator.db.migrate import alembic_config, upgrade_head
from coordinator.db.tables import Base


def _diff(url: str) -> list:
    engine = create_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    return diff


def test_autogenerate_finds_no_difference(database_url: str) -> None:
    assert _diff(database_url) == []


def test_downgrade_to_base_and_upgrade_again(database_url: str) -> None:
    command.downgrade(alembic_config(database_url), "base")
    engine = create_engine(database_url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    upgrade_head(database_url)
    assert _diff(database_url) == []


def test_public_ids_compare_bytewise_on_postgresql(database_url: str) -> None:
    engine = create_engine(database_url)
    if engine.dialect.name == "postgresql":
        for table in ("files", "jobs", "job_events", "job_checkpoints"):
            id_column = next(c for c in inspect(engine).get_columns(table) if c["name"] == "id")
            assert id_column["type"].collation == "C", table
    engine.dispose()

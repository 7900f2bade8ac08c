"""Alembic, driven from code: `upgrade head` for the CLI, the embedded server and the tests."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations
from coordinator.db.engine import ensure_sqlite_dir

MIGRATIONS_DIR = Path(migrations.__file__).parent


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would read '%' in passwords as a directive.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade_head(database_url: str) -> None:
    ensure_sqlite_dir(database_url)
    command.upgrade(alembic_config(database_url), "head")

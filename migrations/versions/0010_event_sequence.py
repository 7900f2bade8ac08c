"""a lease's highest event sequence: an agent that restarts sends again what it cannot know was recorded

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07

`leases.events_seq` is the highest `seq` of the lease's events recorded so far (an event's place in the
trainer's progress file); events at or below it are re-deliveries and are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('leases') as batch:
        batch.add_column(sa.Column('events_seq', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('leases') as batch:
        batch.drop_column('events_seq')

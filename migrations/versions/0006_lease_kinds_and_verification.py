"""lease kinds and independent verification: a lease's kind, a job's stage, its held-out sample and verification

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

A lease carries its kind (`train`, `verify`) and a worker the kinds its agent runs (`lease_kinds`, from its
claims); a job's `stage` is the kind of lease it is queued for; a job keeps
back a held-out sample of its training data that no trainer receives (`held_out`), says whether its customer asked
for verification (`verification_mode`) and what verification found (`verification`).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('leases') as batch:
        batch.add_column(sa.Column('kind', sa.String(length=16), nullable=False, server_default='train'))
    with op.batch_alter_table('leases') as batch:
        batch.alter_column('kind', server_default=None)
    with op.batch_alter_table('workers') as batch:
        batch.add_column(sa.Column('lease_kinds', sa.JSON(none_as_null=True), nullable=True))
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('stage', sa.String(length=16), nullable=False, server_default='train'))
        batch.add_column(sa.Column('verification_mode', sa.String(length=16), nullable=False, server_default='auto'))
        batch.add_column(sa.Column('held_out', sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column('verification', sa.JSON(none_as_null=True), nullable=True))
    with op.batch_alter_table('jobs') as batch:
        batch.alter_column('stage', server_default=None)
        batch.alter_column('verification_mode', server_default=None)


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        for name in ('verification', 'held_out', 'verification_mode', 'stage'):
            batch.drop_column(name)
    with op.batch_alter_table('workers') as batch:
        batch.drop_column('lease_kinds')
    with op.batch_alter_table('leases') as batch:
        batch.drop_column('kind')

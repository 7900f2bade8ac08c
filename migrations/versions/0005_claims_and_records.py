"""money rules against cheating: a worker's claims, preemption strikes, the provider's record, placement exclusions

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

A lease keeps what its worker claimed about the job (`claim`: a user error the coordinator has not confirmed);
a worker counts its preemptions, the strikes the preemption rule gave it and its unconfirmed claims, and starts
from its provider's record (`inherited_*`); a job lists the providers and workers it is not placed on again and
where its price cap came from (`max_price_source`: the customer's, or the market's default).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_WORKER_COUNTERS = ('preempted_leases', 'preemption_strikes', 'unconfirmed_claims', 'inherited_completed',
                    'inherited_lost', 'inherited_failed_checks')


def upgrade() -> None:
    with op.batch_alter_table('leases') as batch:
        batch.add_column(sa.Column('claim', sa.String(length=32), nullable=True))
    with op.batch_alter_table('workers') as batch:
        for name in _WORKER_COUNTERS:
            batch.add_column(sa.Column(name, sa.Integer(), nullable=False, server_default='0'))
    with op.batch_alter_table('workers') as batch:
        for name in _WORKER_COUNTERS:
            batch.alter_column(name, server_default=None)
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('excluded_providers', sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column('excluded_workers', sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column('max_price_source', sa.String(length=16), nullable=True))
    op.execute(sa.text("UPDATE jobs SET max_price_source = 'customer' WHERE max_price_per_gpu_hour IS NOT NULL"))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('max_price_source')
        batch.drop_column('excluded_workers')
        batch.drop_column('excluded_providers')
    with op.batch_alter_table('workers') as batch:
        for name in reversed(_WORKER_COUNTERS):
            batch.drop_column(name)
    with op.batch_alter_table('leases') as batch:
        batch.drop_column('claim')

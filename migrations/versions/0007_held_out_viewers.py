"""held-out viewers: the providers that held a verification lease of a job with a given held-out sample

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

Jobs on the same data keep back the same held-out sample, so a provider that may have downloaded it as a
verifier of one job never trains another job with it (`held_out_viewers`, filled from the verification leases
already granted).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PUBLIC_ID = sa.String(length=40).with_variant(sa.String(length=40, collation='C'), 'postgresql')


def upgrade() -> None:
    op.create_table('held_out_viewers',
    sa.Column('provider_id', PUBLIC_ID, nullable=False),
    sa.Column('sample_sha256', sa.String(length=64), nullable=False),
    sa.Column('first_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['provider_id'], ['accounts.id'], name=op.f('fk_held_out_viewers_provider_id_accounts')),
    sa.PrimaryKeyConstraint('provider_id', 'sample_sha256', name=op.f('pk_held_out_viewers'))
    )
    op.create_index('ix_held_out_viewers_sample_sha256', 'held_out_viewers', ['sample_sha256'], unique=False)
    conn = op.get_bind()
    seen: set[tuple[str, str]] = set()
    for provider_id, held_out in conn.execute(sa.text(
            "SELECT w.account_id, j.held_out FROM leases l JOIN workers w ON w.id = l.worker_id "
            "JOIN jobs j ON j.id = l.job_id WHERE l.kind = 'verify' AND j.held_out IS NOT NULL")):
        sample = (json.loads(held_out) if isinstance(held_out, str) else held_out or {}).get('sha256')
        if sample and (provider_id, sample) not in seen:
            seen.add((provider_id, sample))
            conn.execute(sa.text("INSERT INTO held_out_viewers (provider_id, sample_sha256, first_seen_at) "
                                 "VALUES (:p, :s, :t)"), {"p": provider_id, "s": sample, "t": datetime.now(UTC)})


def downgrade() -> None:
    op.drop_index('ix_held_out_viewers_sample_sha256', table_name='held_out_viewers')
    op.drop_table('held_out_viewers')

"""upload tickets: the presigned PUTs each lease holds open

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07

A lease may hold a few direct uploads open at a time (`services/uploads.py`); each row is one, until its upload
is adopted or it lapses and its object is deleted.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'upload_tickets',
        sa.Column('key', sa.String(length=200), nullable=False),
        sa.Column('lease_id', sa.String(length=40).with_variant(sa.String(length=40, collation='C'), 'postgresql'),
                  nullable=False),
        sa.Column('bytes', sa.BigInteger(), nullable=False),
        sa.Column('lapses_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['lease_id'], ['leases.id'], name=op.f('fk_upload_tickets_lease_id_leases'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('key', name=op.f('pk_upload_tickets')),
    )
    op.create_index(op.f('ix_upload_tickets_lease_id'), 'upload_tickets', ['lease_id'])
    op.create_index(op.f('ix_upload_tickets_lapses_at'), 'upload_tickets', ['lapses_at'])


def downgrade() -> None:
    op.drop_index(op.f('ix_upload_tickets_lapses_at'), table_name='upload_tickets')
    op.drop_index(op.f('ix_upload_tickets_lease_id'), table_name='upload_tickets')
    op.drop_table('upload_tickets')

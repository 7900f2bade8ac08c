"""exports: a job row's kind, and the export of a fine-tune as a job of its own

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04

A row of `jobs` is a piece of paid work on the fleet: a fine-tuning job (`kind` "fine_tuning"), or the export of
one (`kind` "export": its adapter merged into the base, GGUF files), which has the fine-tuning job as its
`parent_job_id`. `export` holds a fine-tuning job's formats asked for at creation, and an export's formats, the
checkpoint it exports and its result files (services/exports.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PUBLIC_ID = sa.String(length=40).with_variant(sa.String(length=40, collation='C'), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('kind', sa.String(length=16), nullable=False, server_default='fine_tuning'))
        batch.add_column(sa.Column('parent_job_id', PUBLIC_ID, nullable=True))
        batch.add_column(sa.Column('export', sa.JSON(none_as_null=True), nullable=True))
        batch.create_foreign_key('fk_jobs_parent_job_id_jobs', 'jobs', ['parent_job_id'], ['id'], ondelete='CASCADE')
        batch.create_index('ix_jobs_parent_job_id', ['parent_job_id'])
    with op.batch_alter_table('jobs') as batch:
        batch.alter_column('kind', server_default=None)


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_index('ix_jobs_parent_job_id')
        batch.drop_constraint('fk_jobs_parent_job_id_jobs', type_='foreignkey')
        for name in ('export', 'parent_job_id', 'kind'):
            batch.drop_column(name)

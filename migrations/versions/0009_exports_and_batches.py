"""exports and batches: a job row's kind, the export of a fine-tune and a batch of requests as jobs of their own

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04

A row of `jobs` is a piece of paid work on the fleet: a fine-tuning job (`kind` "fine_tuning"), or the export of
one (`kind` "export": its adapter merged into the base, GGUF files), which has the fine-tuning job as its
`parent_job_id`. `export` holds a fine-tuning job's formats asked for at creation, and an export's formats, the
checkpoint it exports and its result files (services/exports.py). A batch (`kind` "batch": OpenAI's Batch API,
services/batches.py) keeps its state in `batch` and each request, and its answer once it has one, in `batch_requests`; a batch
file records its one `model`. A fine-tuning job's `evaluation`: its validation prompts through the base and the
fine-tune, as two batches (services/evaluations.py).
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
        batch.add_column(sa.Column('batch', sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column('evaluation', sa.JSON(none_as_null=True), nullable=True))
    with op.batch_alter_table('files') as batch:
        batch.add_column(sa.Column('model', sa.String(length=240), nullable=True))
    op.create_table(
        'batch_requests',
        sa.Column('id', PUBLIC_ID, nullable=False),
        sa.Column('job_id', PUBLIC_ID, nullable=False),
        sa.Column('custom_id', sa.String(length=512), nullable=False),
        sa.Column('line', sa.Integer(), nullable=False),
        sa.Column('max_tokens', sa.Integer(), nullable=False),
        sa.Column('prompt_bytes', sa.Integer(), nullable=False),
        sa.Column('lease_id', PUBLIC_ID, nullable=True),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('content', sa.Text(), nullable=True),
        sa.Column('finish_reason', sa.String(length=16), nullable=True),
        sa.Column('prompt_tokens', sa.Integer(), nullable=False),
        sa.Column('completion_tokens', sa.Integer(), nullable=False),
        sa.Column('error', sa.JSON(none_as_null=True), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('answered_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_batch_requests_job_id_jobs'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_batch_requests')),
        sa.UniqueConstraint('job_id', 'custom_id', name=op.f('uq_batch_requests_job_id_custom_id')),
    )
    with op.batch_alter_table('batch_requests') as batch:
        batch.create_index('ix_batch_requests_job_id_line', ['job_id', 'line'], unique=False)
        batch.create_index('ix_batch_requests_lease_id', ['lease_id'], unique=False)


def downgrade() -> None:
    op.drop_table('batch_requests')
    with op.batch_alter_table('files') as batch:
        batch.drop_column('model')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('batch')
        batch.drop_column('evaluation')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_index('ix_jobs_parent_job_id')
        batch.drop_constraint('fk_jobs_parent_job_id_jobs', type_='foreignkey')
        for name in ('export', 'parent_job_id', 'kind'):
            batch.drop_column(name)

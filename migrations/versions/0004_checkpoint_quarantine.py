"""checkpoints: quarantine (a checkpoint that failed its checks is never resumed from)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Checkpoints stored before this revision were never checked (and held pickles): they are quarantined, so no
worker is ever handed one to open.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('job_checkpoints') as batch:
        batch.add_column(sa.Column('quarantined_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('quarantine_reason', sa.Text(), nullable=True))
    op.execute(sa.text(
        "UPDATE job_checkpoints SET quarantined_at = CURRENT_TIMESTAMP, "
        "quarantine_reason = 'stored before checkpoints were checked at upload' WHERE blob_sha256 IS NOT NULL"))


def downgrade() -> None:
    with op.batch_alter_table('job_checkpoints') as batch:
        batch.drop_column('quarantine_reason')
        batch.drop_column('quarantined_at')

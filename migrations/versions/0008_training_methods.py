"""training methods: DPO, continued training, early stopping, integrations, and files that use tools

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03

A job's `method` (supervised or dpo), the fine-tune or checkpoint it continues (`initial_model`, and the
adapter blob the coordinator keeps for it in `initial_adapter`), its `early_stopping` option and outcome, and
its `integrations` (Weights & Biases); a file records whether its examples use tools, which only models whose
chat template expresses tools can train on.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('method', sa.String(length=16), nullable=False, server_default='supervised'))
        batch.add_column(sa.Column('initial_model', sa.String(length=240), nullable=True))
        batch.add_column(sa.Column('initial_adapter', sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column('early_stopping', sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column('integrations', sa.JSON(none_as_null=True), nullable=True))
    with op.batch_alter_table('jobs') as batch:
        batch.alter_column('method', server_default=None)
    with op.batch_alter_table('files') as batch:
        batch.add_column(sa.Column('uses_tools', sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table('files') as batch:
        batch.alter_column('uses_tools', server_default=None)


def downgrade() -> None:
    with op.batch_alter_table('files') as batch:
        batch.drop_column('uses_tools')
    with op.batch_alter_table('jobs') as batch:
        for name in ('integrations', 'early_stopping', 'initial_adapter', 'initial_model', 'method'):
            batch.drop_column(name)

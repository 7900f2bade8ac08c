"""workers and leases

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op



revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Public ids compare byte-wise on PostgreSQL (see coordinator.db.tables.PublicId).
PUBLIC_ID = sa.String(length=40).with_variant(sa.String(length=40, collation='C'), 'postgresql')


def upgrade() -> None:
    op.create_table('workers',
    sa.Column('id', PUBLIC_ID, nullable=False),
    sa.Column('account_id', PUBLIC_ID, nullable=False),
    sa.Column('machine_id', sa.String(length=128), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('token_prefix', sa.String(length=16), nullable=False),
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('agent_version', sa.String(length=128), nullable=False),
    sa.Column('protocol_version', sa.Integer(), nullable=False),
    sa.Column('driver_version', sa.String(length=128), nullable=True),
    sa.Column('cuda_version', sa.String(length=128), nullable=True),
    sa.Column('gpus', sa.JSON(none_as_null=True), nullable=False),
    sa.Column('cpu', sa.JSON(none_as_null=True), nullable=True),
    sa.Column('gpu_class', sa.String(length=32), nullable=False),
    sa.Column('gpu_name', sa.String(length=128), nullable=False),
    sa.Column('vram_total_bytes', sa.BigInteger(), nullable=False),
    sa.Column('vram_free_bytes', sa.BigInteger(), nullable=False),
    sa.Column('compute_capability', sa.String(length=8), nullable=True),
    sa.Column('ask_price_per_gpu_hour', sa.BigInteger(), nullable=False),
    sa.Column('policy', sa.JSON(none_as_null=True), nullable=False),
    sa.Column('cached_models', sa.JSON(none_as_null=True), nullable=False),
    sa.Column('state', sa.Enum('idle', 'working', 'paused', 'offline', 'suspended', name='workerstate', native_enum=False, length=32), nullable=False),
    sa.Column('pause_reason', sa.Text(), nullable=True),
    sa.Column('available_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('telemetry', sa.JSON(none_as_null=True), nullable=True),
    sa.Column('trusted', sa.Boolean(), nullable=False),
    sa.Column('reliability', sa.Float(), nullable=False),
    sa.Column('speed_factor', sa.Float(), nullable=False),
    sa.Column('completed_leases', sa.Integer(), nullable=False),
    sa.Column('lost_leases', sa.Integer(), nullable=False),
    sa.Column('failed_checks', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('suspended_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_workers_account_id_accounts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_workers')),
    sa.UniqueConstraint('account_id', 'machine_id', name=op.f('uq_workers_account_id_machine_id')),
    sa.UniqueConstraint('token_prefix', name=op.f('uq_workers_token_prefix'))
    )
    op.create_index('ix_workers_state_available_until', 'workers', ['state', 'available_until'], unique=False)
    op.create_table('leases',
    sa.Column('id', PUBLIC_ID, nullable=False),
    sa.Column('job_id', PUBLIC_ID, nullable=False),
    sa.Column('worker_id', PUBLIC_ID, nullable=False),
    sa.Column('fencing_token', sa.Integer(), nullable=False),
    sa.Column('status', sa.Enum('assigned', 'running', 'completed', 'failed', 'preempted', 'lost', 'cancelled', name='leasestatus', native_enum=False, length=32), nullable=False),
    sa.Column('gpu_uuid', sa.String(length=128), nullable=True),
    sa.Column('gpu_class', sa.String(length=32), nullable=False),
    sa.Column('ask_price_per_gpu_hour', sa.BigInteger(), nullable=False),
    sa.Column('price_per_gpu_hour', sa.BigInteger(), nullable=False),
    sa.Column('resume_checkpoint_id', PUBLIC_ID, nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('training_started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_renewed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('suspect_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_step', sa.Integer(), nullable=True),
    sa.Column('tokens_per_s', sa.Float(), nullable=True),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('end_reason', sa.Text(), nullable=True),
    sa.Column('usage', sa.JSON(none_as_null=True), nullable=True),
    sa.Column('adapter_key', sa.String(length=120), nullable=True),
    sa.Column('adapter_sha256', sa.String(length=64), nullable=True),
    sa.Column('adapter_bytes', sa.BigInteger(), nullable=True),
    sa.Column('result', sa.JSON(none_as_null=True), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_leases_job_id_jobs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['resume_checkpoint_id'], ['job_checkpoints.id'], name=op.f('fk_leases_resume_checkpoint_id_job_checkpoints')),
    sa.ForeignKeyConstraint(['worker_id'], ['workers.id'], name=op.f('fk_leases_worker_id_workers')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_leases')),
    sa.UniqueConstraint('job_id', 'fencing_token', name=op.f('uq_leases_job_id_fencing_token'))
    )
    op.create_index('ix_leases_status_last_renewed_at', 'leases', ['status', 'last_renewed_at'], unique=False)
    op.create_index('ix_leases_worker_id_status', 'leases', ['worker_id', 'status'], unique=False)
    live = sa.text("status IN ('assigned', 'running')")
    op.create_index('uq_leases_live_job_id', 'leases', ['job_id'], unique=True, postgresql_where=live, sqlite_where=live)
    with op.batch_alter_table('job_checkpoints') as batch_op:
        batch_op.add_column(sa.Column('lease_id', sa.String(length=40), nullable=True))
    # Existing jobs start with no lease issued and no attempt used; the default only fills those rows.
    with op.batch_alter_table('jobs') as batch_op:
        batch_op.add_column(sa.Column('fencing_token', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('attempts', sa.Integer(), nullable=False, server_default='0'))
    with op.batch_alter_table('jobs') as batch_op:
        batch_op.alter_column('fencing_token', server_default=None)
        batch_op.alter_column('attempts', server_default=None)


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch_op:
        batch_op.drop_column('attempts')
        batch_op.drop_column('fencing_token')
    with op.batch_alter_table('job_checkpoints') as batch_op:
        batch_op.drop_column('lease_id')
    op.drop_index('uq_leases_live_job_id', table_name='leases')
    op.drop_index('ix_leases_worker_id_status', table_name='leases')
    op.drop_index('ix_leases_status_last_renewed_at', table_name='leases')
    op.drop_table('leases')
    op.drop_index('ix_workers_state_available_until', table_name='workers')
    op.drop_table('workers')

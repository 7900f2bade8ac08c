"""money: ledger, usage, top-ups, payouts, outbox

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op



revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Public ids compare byte-wise on PostgreSQL (see coordinator.db.tables.PublicId).
PUBLIC_ID = sa.String(length=40).with_variant(sa.String(length=40, collation='C'), 'postgresql')


def upgrade() -> None:
    op.create_table('ledger_balances',
    sa.Column('book', sa.Enum('customer_available', 'customer_held', 'provider_payable', 'platform_revenue', 'platform_grants', 'stripe_clearing', 'refunds', name='book', native_enum=False, length=32), nullable=False),
    sa.Column('owner_id', PUBLIC_ID, nullable=False),
    sa.Column('balance', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('book', 'owner_id', name=op.f('pk_ledger_balances'))
    )
    op.create_table('ledger_transactions',
    sa.Column('id', PUBLIC_ID, nullable=False),
    sa.Column('business_key', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('account_id', PUBLIC_ID, nullable=True),
    sa.Column('job_id', PUBLIC_ID, nullable=True),
    sa.Column('lease_id', PUBLIC_ID, nullable=True),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger_transactions')),
    sa.UniqueConstraint('business_key', name=op.f('uq_ledger_transactions_business_key'))
    )
    with op.batch_alter_table('ledger_transactions', schema=None) as batch_op:
        batch_op.create_index('ix_ledger_transactions_account_id_id', ['account_id', 'id'], unique=False)

    op.create_table('outbox',
    sa.Column('id', PUBLIC_ID, nullable=False),
    sa.Column('operation', sa.String(length=48), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=False),
    sa.Column('subject_id', PUBLIC_ID, nullable=False),
    sa.Column('params', sa.JSON(none_as_null=True), nullable=False),
    sa.Column('status', sa.Enum('pending', 'done', 'failed', name='outboxstatus', native_enum=False, length=32), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('response', sa.JSON(none_as_null=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('done_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_outbox_idempotency_key'))
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_status_next_attempt_at', ['status', 'next_attempt_at'], unique=False)

    op.create_table('stripe_events',
    sa.Column('id', sa.String(length=255), nullable=False),
    sa.Column('type', sa.String(length=100), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_stripe_events'))
    )
    op.create_table('ledger_postings',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('transaction_id', PUBLIC_ID, nullable=False),
    sa.Column('book', sa.Enum('customer_available', 'customer_held', 'provider_payable', 'platform_revenue', 'platform_grants', 'stripe_clearing', 'refunds', name='book', native_enum=False, length=32), nullable=False),
    sa.Column('owner_id', PUBLIC_ID, nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['transaction_id'], ['ledger_transactions.id'], name=op.f('fk_ledger_postings_transaction_id_ledger_transactions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger_postings'))
    )
    with op.batch_alter_table('ledger_postings', schema=None) as batch_op:
        batch_op.create_index('ix_ledger_postings_book_owner_id', ['book', 'owner_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_ledger_postings_transaction_id'), ['transaction_id'], unique=False)

    op.create_table('payout_accounts',
    sa.Column('account_id', PUBLIC_ID, nullable=False),
    sa.Column('stripe_account_id', sa.String(length=255), nullable=False),
    sa.Column('payouts_enabled', sa.Boolean(), nullable=False),
    sa.Column('details_submitted', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_payout_accounts_account_id_accounts')),
    sa.PrimaryKeyConstraint('account_id', name=op.f('pk_payout_accounts')),
    sa.UniqueConstraint('stripe_account_id', name=op.f('uq_payout_accounts_stripe_account_id'))
    )
    op.create_table('payouts',
    sa.Column('id', PUBLIC_ID, nullable=False),
    sa.Column('account_id', PUBLIC_ID, nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.Enum('pending', 'paid', 'failed', 'reversed', name='payoutstatus', native_enum=False, length=32), nullable=False),
    sa.Column('destination', sa.String(length=255), nullable=False),
    sa.Column('stripe_transfer_id', sa.String(length=255), nullable=True),
    sa.Column('failure', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_payouts_account_id_accounts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_payouts')),
    sa.UniqueConstraint('stripe_transfer_id', name=op.f('uq_payouts_stripe_transfer_id'))
    )
    with op.batch_alter_table('payouts', schema=None) as batch_op:
        batch_op.create_index('ix_payouts_account_id_id', ['account_id', 'id'], unique=False)

    op.create_table('topups',
    sa.Column('id', PUBLIC_ID, nullable=False),
    sa.Column('account_id', PUBLIC_ID, nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.Enum('pending', 'paid', 'expired', 'failed', name='topupstatus', native_enum=False, length=32), nullable=False),
    sa.Column('request_key', sa.String(length=200), nullable=False),
    sa.Column('stripe_session_id', sa.String(length=255), nullable=True),
    sa.Column('checkout_url', sa.Text(), nullable=True),
    sa.Column('failure', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('paid_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_topups_account_id_accounts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_topups')),
    sa.UniqueConstraint('account_id', 'request_key', name=op.f('uq_topups_account_id_request_key')),
    sa.UniqueConstraint('stripe_session_id', name=op.f('uq_topups_stripe_session_id'))
    )
    with op.batch_alter_table('topups', schema=None) as batch_op:
        batch_op.create_index('ix_topups_account_id_id', ['account_id', 'id'], unique=False)

    op.create_table('usage_records',
    sa.Column('lease_id', PUBLIC_ID, nullable=False),
    sa.Column('job_id', PUBLIC_ID, nullable=False),
    sa.Column('customer_id', PUBLIC_ID, nullable=False),
    sa.Column('provider_id', PUBLIC_ID, nullable=False),
    sa.Column('worker_id', PUBLIC_ID, nullable=False),
    sa.Column('gpu_class', sa.String(length=32), nullable=False),
    sa.Column('price_per_gpu_hour', sa.BigInteger(), nullable=False),
    sa.Column('ask_price_per_gpu_hour', sa.BigInteger(), nullable=False),
    sa.Column('rule', sa.String(length=32), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('billed_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('observed_seconds', sa.Float(), nullable=False),
    sa.Column('reported_seconds', sa.Float(), nullable=True),
    sa.Column('billable_seconds', sa.BigInteger(), nullable=False),
    sa.Column('charge_micros', sa.BigInteger(), nullable=False),
    sa.Column('provider_micros', sa.BigInteger(), nullable=False),
    sa.Column('fee_micros', sa.BigInteger(), nullable=False),
    sa.Column('note', sa.Text(), nullable=True),
    sa.Column('usage_day', sa.Date(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['lease_id'], ['leases.id'], name=op.f('fk_usage_records_lease_id_leases')),
    sa.PrimaryKeyConstraint('lease_id', name=op.f('pk_usage_records'))
    )
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.create_index('ix_usage_records_customer_id_usage_day', ['customer_id', 'usage_day'], unique=False)
        batch_op.create_index(batch_op.f('ix_usage_records_job_id'), ['job_id'], unique=False)
        batch_op.create_index('ix_usage_records_provider_id_created_at', ['provider_id', 'created_at'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('held_micros', sa.BigInteger(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('billed_micros', sa.BigInteger(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('hold_seq', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('accruing_since', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('accruing_price', sa.BigInteger(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('accruing_price')
        batch_op.drop_column('accruing_since')
        batch_op.drop_column('hold_seq')
        batch_op.drop_column('billed_micros')
        batch_op.drop_column('held_micros')

    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_records_provider_id_created_at')
        batch_op.drop_index(batch_op.f('ix_usage_records_job_id'))
        batch_op.drop_index('ix_usage_records_customer_id_usage_day')

    op.drop_table('usage_records')
    with op.batch_alter_table('topups', schema=None) as batch_op:
        batch_op.drop_index('ix_topups_account_id_id')

    op.drop_table('topups')
    with op.batch_alter_table('payouts', schema=None) as batch_op:
        batch_op.drop_index('ix_payouts_account_id_id')

    op.drop_table('payouts')
    op.drop_table('payout_accounts')
    with op.batch_alter_table('ledger_postings', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ledger_postings_transaction_id'))
        batch_op.drop_index('ix_ledger_postings_book_owner_id')

    op.drop_table('ledger_postings')
    op.drop_table('stripe_events')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_status_next_attempt_at')

    op.drop_table('outbox')
    with op.batch_alter_table('ledger_transactions', schema=None) as batch_op:
        batch_op.drop_index('ix_ledger_transactions_account_id_id')

    op.drop_table('ledger_transactions')
    op.drop_table('ledger_balances')

"""A customer's money around their jobs: holds, settlements, releases, credit grants and admins' refunds, and
what the billing API reads (balance, usage, transactions). Every movement goes through `ledger`.

A job runs only against a hold: credit moved from the customer's available balance to held when the job
is queued (`holds.py` sizes it). Each lease's usage is settled from the job's hold when the lease ends
(`metering.py` decides how much); when the job finishes or pauses, what is left of its hold goes back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.db.tables import (
    AccountModel, Book, JobModel, LedgerPostingModel, LedgerTransactionModel, UsageRecordModel, utcnow,
)
from coordinator.services import ledger
from coordinator.services.ledger import HOUSE
from coordinator.services.paging import page
from shared.errors import InvalidRequest, NotFound
from shared.money import micros_to_usd
from shared.pricing import cost_for_seconds


def place_hold(*, session: Session, job: JobModel, amount: int, reason: str) -> None:
    """Move `amount` of the customer's available credit onto the job; 429 (`InsufficientQuota`) if the balance cannot
    cover it."""
    if amount <= 0:
        return
    ledger.require_available(session, job.account_id, amount, purpose=f"job {job.id} ({reason})")
    job.hold_seq += 1
    ledger.move(session=session, key=f"hold:{job.id}:{job.hold_seq}", kind="hold", amount=amount,
                frm=(Book.customer_available, job.account_id), to=(Book.customer_held, job.account_id),
                description=f"Hold for fine-tuning job {job.id}: {reason}", account_id=job.account_id, job_id=job.id)
    job.held_micros += amount


def release(*, session: Session, job: JobModel, reason: str, keep: int = 0) -> None:
    """What is left of the job's hold goes back to the customer's available balance, but for `keep` (what a
    paused redundant job's confirmed training will still be charged: `replicas.py`)."""
    amount = job.held_micros - max(keep, 0)
    if amount <= 0:
        return
    job.hold_seq += 1  # names this release, and a hold placed after it
    ledger.move(session=session, key=f"release:{job.id}:{job.hold_seq}", kind="release", amount=amount,
                frm=(Book.customer_held, job.account_id), to=(Book.customer_available, job.account_id),
                description=f"Released the rest of job {job.id}'s hold: {reason}", account_id=job.account_id,
                job_id=job.id)
    job.held_micros -= amount


def settle(*, session: Session, job: JobModel, record: UsageRecordModel) -> None:
    """Charge a lease's usage: from the job's hold first (any excess from the available balance), to the
    provider's payable earnings and our fee. Posted once per lease."""
    charge = record.charge_micros
    from_held = min(charge, job.held_micros)
    posted = ledger.post(
        session=session, key=f"settle:{record.lease_id}", kind="settle", account_id=job.account_id, job_id=job.id,
        lease_id=record.lease_id,
        description=f"Fine-tuning job {job.id}: {record.billable_seconds} s on {record.gpu_class} at "
                    f"${micros_to_usd(record.price_per_gpu_hour)}/GPU-hour (lease {record.lease_id})",
        entries=[
            ledger.Entry(Book.customer_held, job.account_id, -from_held),
            ledger.Entry(Book.customer_available, job.account_id, -(charge - from_held)),
            ledger.Entry(Book.provider_payable, record.provider_id, record.provider_micros),
            ledger.Entry(Book.platform_revenue, HOUSE, record.fee_micros),
        ],
    )
    if posted is not None:
        job.held_micros -= from_held
        job.billed_micros += charge


def settle_verification(*, session: Session, job: JobModel, record: UsageRecordModel) -> None:
    """Pay a verifier: its earnings are the platform's cost (the verification book); the customer pays nothing.
    Posted once per lease."""
    if record.provider_micros <= 0:
        return
    ledger.post(
        session=session, key=f"settle:{record.lease_id}", kind="verification", account_id=record.provider_id,
        job_id=job.id, lease_id=record.lease_id,
        description=f"Verification of fine-tuning job {job.id}: {record.billable_seconds} s on {record.gpu_class} at "
                    f"${micros_to_usd(record.ask_price_per_gpu_hour)}/GPU-hour (lease {record.lease_id})",
        entries=[ledger.Entry(Book.provider_payable, record.provider_id, record.provider_micros),
                 ledger.Entry(Book.verification, HOUSE, -record.provider_micros)],
    )


def grant(*, session: Session, account: AccountModel, amount: int, key: str, memo: str) -> str | None:
    """Credit granted by an admin (no Stripe needed); once per `key`."""
    if amount <= 0:
        raise InvalidRequest("A grant must be a positive amount.", param="amount")
    return ledger.move(session=session, key=f"grant:{key}", kind="grant", amount=amount,
                       frm=(Book.platform_grants, HOUSE), to=(Book.customer_available, account.id),
                       description=f"Credit granted: {memo}", account_id=account.id)


# --- what the API shows ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class JobCost:
    so_far: int  # settled leases, confirmed trainings still to settle, and the running lease's time so far
    held: int


def job_cost(job: JobModel, now: datetime | None = None, *, pending: int = 0) -> JobCost:
    """`pending`: what confirmed trainings waiting to settle will be charged (`replicas.pending_charge`)."""
    running = 0
    if job.accruing_since is not None and job.accruing_price is not None:
        seconds = max(int(((now or utcnow()) - job.accruing_since).total_seconds()), 0)
        running = cost_for_seconds(job.accruing_price, seconds)
        if job.max_cost is not None:
            running = min(running, max(job.max_cost - job.billed_micros - pending, 0))
    return JobCost(so_far=job.billed_micros + pending + running, held=job.held_micros)


@dataclass(frozen=True, slots=True)
class Balance:
    available: int
    held: int


def balance_of(*, session: Session, account: AccountModel) -> Balance:
    result = Balance(available=ledger.balance(session, Book.customer_available, account.id),
                     held=ledger.balance(session, Book.customer_held, account.id))
    session.commit()
    return result


@dataclass(frozen=True, slots=True)
class UsageRow:
    key: str  # the job id or the day
    gpu_class: str
    price_per_gpu_hour: int
    leases: int
    seconds: int
    cost: int


def usage(
    *, session: Session, account: AccountModel, group_by: Literal["job", "day"], start: date | None,
    end: date | None, limit: int,
) -> list[UsageRow]:
    """The customer's metered usage per job or per UTC day, split by GPU class and rate; newest first."""
    key = UsageRecordModel.job_id if group_by == "job" else UsageRecordModel.usage_day
    stmt = (select(key, UsageRecordModel.gpu_class, UsageRecordModel.price_per_gpu_hour, func.count(),
                   func.sum(UsageRecordModel.billable_seconds), func.sum(UsageRecordModel.charge_micros),
                   func.max(UsageRecordModel.created_at))
            .where(UsageRecordModel.customer_id == account.id)
            .group_by(key, UsageRecordModel.gpu_class, UsageRecordModel.price_per_gpu_hour))
    if start is not None:
        stmt = stmt.where(UsageRecordModel.usage_day >= start)
    if end is not None:
        stmt = stmt.where(UsageRecordModel.usage_day <= end)
    stmt = stmt.order_by(func.max(UsageRecordModel.created_at).desc(), key.desc()).limit(limit)
    rows = [UsageRow(key=str(k), gpu_class=gpu, price_per_gpu_hour=int(price), leases=int(n), seconds=int(sec or 0),
                     cost=int(cost or 0)) for k, gpu, price, n, sec, cost, _ in session.execute(stmt)]
    session.commit()
    return rows


@dataclass(frozen=True, slots=True)
class Transaction:
    row: LedgerTransactionModel
    available: int  # how it changed the caller's available balance
    held: int
    payable: int


def transactions(*, session: Session, account: AccountModel, after: str | None, limit: int) -> tuple[list[Transaction], bool]:
    """The caller's ledger transactions, newest first, with what each did to their own books."""
    rows, has_more = page(session=session, stmt=select(LedgerTransactionModel).where(
        LedgerTransactionModel.account_id == account.id), id_column=LedgerTransactionModel.id, after=after, limit=limit)
    effects: dict[tuple[str, Book], int] = {}
    if rows:
        for txn_id, book, amount in session.execute(
            select(LedgerPostingModel.transaction_id, LedgerPostingModel.book, func.sum(LedgerPostingModel.amount))
            .where(LedgerPostingModel.transaction_id.in_([r.id for r in rows]),
                   LedgerPostingModel.owner_id == account.id)
            .group_by(LedgerPostingModel.transaction_id, LedgerPostingModel.book)
        ):
            effects[(txn_id, book)] = int(amount)
    session.commit()
    return [Transaction(row=r, available=effects.get((r.id, Book.customer_available), 0),
                        held=effects.get((r.id, Book.customer_held), 0),
                        payable=effects.get((r.id, Book.provider_payable), 0)) for r in rows], has_more


def job_refunded(session: Session, job_id: str) -> int:
    """What admins have refunded of a job so far."""
    return int(session.scalar(
        select(func.coalesce(func.sum(LedgerPostingModel.amount), 0))
        .join(LedgerTransactionModel, LedgerTransactionModel.id == LedgerPostingModel.transaction_id)
        .where(LedgerTransactionModel.kind == "job_refund", LedgerTransactionModel.job_id == job_id,
               LedgerPostingModel.book == Book.customer_available)) or 0)


def refund_job(*, session: Session, job_id: str, amount: int, nonce: str, admin: AccountModel, reason: str) -> str | None:
    """Give a customer back (part of) what a job was charged, as credit: a `job_refund` transaction from the
    platform's refunds book. At most what the job was charged, less earlier refunds; once per form `nonce`."""
    job = session.get(JobModel, job_id, with_for_update=True)
    if job is None:
        raise NotFound(f"No such fine-tuning job: {job_id}", param="job_id")
    refundable = job.billed_micros - job_refunded(session, job_id)
    if amount <= 0 or amount > refundable:
        raise InvalidRequest(f"A refund of this job is between $0.000001 and ${micros_to_usd(refundable)} "
                             f"(charged ${micros_to_usd(job.billed_micros)}, less earlier refunds).", param="amount")
    posted = ledger.move(session=session, key=f"job-refund:{job_id}:{nonce}", kind="job_refund", amount=amount,
                         frm=(Book.refunds, HOUSE), to=(Book.customer_available, job.account_id),
                         description=f"Refund for fine-tuning job {job_id} by {admin.name}: {reason}",
                         account_id=job.account_id, job_id=job_id)
    session.commit()
    return posted

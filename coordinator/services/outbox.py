"""The outbox: calls to Stripe as rows, committed with the state change that needs them, then made (at once,
and again by a periodic sweep until Stripe answers) with the row's idempotency key. This module is the queue
and its rows' lifecycle; making the calls and applying their answers is `stripe_sync.py`.

If the process dies after Stripe acted but before we recorded its answer, the row is still pending; the next
attempt sends the same key, Stripe answers with the object it already made, and we record that. So a
transfer is made once, never twice, and never lost. Attempts back off and are bounded; a call Stripe refuses
for good is marked failed and its subject (a payout, a top-up) is told.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.ids import new_id
from coordinator.db.tables import OutboxModel, OutboxStatus, utcnow
from coordinator.stripe_gateway import StripeGateway, StripeRefused

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 12  # with the backoff below, about a day of trying
BACKOFF_BASE_S = 30
BACKOFF_MAX_S = 6 * 3600
SWEEP_BATCH = 100


def enqueue(*, session: Session, operation: str, key: str, subject_id: str, params: dict[str, Any]) -> OutboxModel:
    """Add the call to the caller's transaction (which commits it with the state it belongs to)."""
    if operation not in StripeGateway.OPERATIONS:
        raise ValueError(f"unknown Stripe operation {operation}")
    row = OutboxModel(id=new_id("obx-"), operation=operation, idempotency_key=key, subject_id=subject_id,
                      params=params, status=OutboxStatus.pending, attempts=0, next_attempt_at=utcnow())
    session.add(row)
    return row


@dataclass(frozen=True, slots=True)
class Call:
    row_id: str
    operation: str
    params: dict[str, Any]
    key: str


@dataclass(frozen=True, slots=True)
class Answer:
    result: dict[str, Any] | None = None
    refused: StripeRefused | None = None
    error: str | None = None  # no answer (timeout, 5xx, ...): try again later


def pending_call(*, session: Session, row_id: str) -> Call | None:
    """The row's call if it still needs making (commits: no lock is held while Stripe is asked)."""
    row = session.get(OutboxModel, row_id)
    call = None
    if row is not None and row.status is OutboxStatus.pending:
        call = Call(row_id=row.id, operation=row.operation, params=dict(row.params), key=row.idempotency_key)
    session.commit()
    return call


@dataclass(frozen=True, slots=True)
class Settled:
    """A call Stripe answered for good (or that gave up): what its subject must hear."""

    row: OutboxModel
    result: dict[str, Any] | None
    refused: StripeRefused | None


def record(*, session: Session, row_id: str, answer: Answer) -> Settled | None:
    """Record Stripe's answer on the locked row, or schedule the next attempt (the caller commits). The call
    settled, for its subject to apply in the same transaction; None when there is nothing to apply (another
    process recorded it first, or it will be tried again)."""
    row = session.get(OutboxModel, row_id, with_for_update=True, populate_existing=True)
    assert row is not None
    if row.status is not OutboxStatus.pending:
        return None
    row.attempts += 1
    now = utcnow()
    if answer.result is not None or answer.refused is not None:
        row.status = OutboxStatus.done if answer.result is not None else OutboxStatus.failed
        row.response, row.last_error, row.done_at = answer.result, answer.error, now
        return Settled(row=row, result=answer.result, refused=answer.refused)
    row.last_error = answer.error
    if row.attempts >= MAX_ATTEMPTS:
        log.error("outbox %s (%s) gave up after %d attempts: %s", row.id, row.operation, row.attempts, answer.error)
        row.status = OutboxStatus.failed
        return Settled(row=row, result=None, refused=StripeRefused(
            f"no answer from Stripe after {row.attempts} attempts: {answer.error}", code="unreachable"))
    delay = min(BACKOFF_BASE_S * 2 ** (row.attempts - 1), BACKOFF_MAX_S)
    row.next_attempt_at = now + timedelta(seconds=delay)
    log.warning("outbox %s (%s) attempt %d failed, next in %d s: %s", row.id, row.operation, row.attempts,
                delay, answer.error)
    return None


def due(*, session: Session) -> list[str]:
    """Pending calls whose time has come, oldest first (commits)."""
    ids = list(session.scalars(select(OutboxModel.id).where(
        OutboxModel.status == OutboxStatus.pending, OutboxModel.next_attempt_at <= utcnow())
        .order_by(OutboxModel.next_attempt_at).limit(SWEEP_BATCH)))
    session.commit()
    return ids

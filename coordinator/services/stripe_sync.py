"""Talking to Stripe, in one direction: make the outbox's calls (`outbox.py` queues them), and hand what Stripe
says back (an answer to a call, or a verified webhook event) to the top-up or payout it concerns.

Imports run one way: this module calls `topups` and `payouts`; they only queue calls in the outbox. Each
webhook event id is acted on once (a replayed delivery answers 200 and changes nothing), and each effect is
also idempotent on its own business key (a top-up credits once per Checkout Session, even if Stripe sends two
different events for it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from coordinator.db.tables import OutboxModel, OutboxStatus, StripeEventModel
from coordinator.services import outbox, payouts, topups
from coordinator.services.outbox import Answer, Call, Settled
from coordinator.settings import CoordinatorSettings
from coordinator.stripe_gateway import StripeGateway, StripeRefused, StripeUnavailable

log = logging.getLogger(__name__)


# --- calls and their answers ----------------------------------------------------------------------

def _answer_handler(operation: str) -> Callable[..., None] | None:
    """Who hears the answer to each kind of call (looked up per call, so a test can stand in for one)."""
    return {
        "checkout.session.create": topups.on_checkout_session,
        "account.create": payouts.on_account,
        "account_link.create": None,  # read by the request that asked for the link
        "transfer.create": payouts.on_transfer,
    }[operation]


def make_call(gateway: StripeGateway, call: Call) -> Answer:
    """Ask Stripe (no database work: safe outside any session or connection)."""
    try:
        return Answer(result=gateway.call(call.operation, call.params, idempotency_key=call.key))
    except StripeRefused as exc:
        return Answer(refused=exc, error=f"refused: {exc}")
    except StripeUnavailable as exc:
        return Answer(error=str(exc))


def _apply(session: Session, settled: Settled) -> None:
    handler = _answer_handler(settled.row.operation)
    if handler is not None:
        handler(session=session, row=settled.row, result=settled.result, refused=settled.refused)


def record_answer(*, session: Session, row_id: str, answer: Answer) -> OutboxModel:
    """Record Stripe's answer and apply it to the row's subject in one commit, or schedule the next attempt."""
    settled = outbox.record(session=session, row_id=row_id, answer=answer)
    if settled is not None:
        _apply(session, settled)
    session.commit()
    row = session.get(OutboxModel, row_id)
    assert row is not None
    return row


def send(*, session: Session, gateway: StripeGateway, row_id: str) -> OutboxModel:
    """Make the row's call once and record the answer (for background work; a request handler does the three
    steps itself, `api/deps.call_stripe`, so that no database connection waits on Stripe)."""
    call = outbox.pending_call(session=session, row_id=row_id)
    if call is None:
        row = session.get(OutboxModel, row_id)
        assert row is not None
        return row
    return record_answer(session=session, row_id=row_id, answer=make_call(gateway, call))


def send_due(*, session: Session, gateway: StripeGateway) -> int:
    """Retry every pending call whose time has come; how many were answered."""
    answered = 0
    for row_id in outbox.due(session=session):
        if send(session=session, gateway=gateway, row_id=row_id).status is not OutboxStatus.pending:
            answered += 1
    return answered


def run_payouts(*, session: Session, settings: CoordinatorSettings, gateway: StripeGateway | None) -> int:
    """The scheduled payout run: queue what is due, then send it (and anything else the outbox still owes)."""
    if gateway is None:
        return 0
    payouts.create_payouts(session=session, settings=settings)
    return send_due(session=session, gateway=gateway)


# --- webhook events -------------------------------------------------------------------------------

def handle_event(*, session: Session, event: dict[str, Any]) -> str:
    """Act on one verified event (`api/webhooks.py` checked its signature); what was done, for the reply and
    the log."""
    if session.get(StripeEventModel, event["id"]) is not None:
        session.commit()
        return "duplicate"
    session.add(StripeEventModel(id=event["id"], type=event["type"]))
    obj = event["data"]["object"]
    kind = event["type"]
    if kind in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
        outcome = topups.credit_paid_session(session=session, stripe_session=obj)
    elif kind == "checkout.session.expired":
        outcome = topups.expire_session(session=session, stripe_session=obj)
    elif kind == "charge.refunded":
        outcome = topups.refund_charge(session=session, charge=obj)
    elif kind == "account.updated":
        outcome = payouts.account_updated(session=session, stripe_account=obj)
    elif kind == "transfer.reversed":
        outcome = payouts.transfer_reversed(session=session, transfer=obj)
    else:
        outcome = "ignored"
    session.commit()
    log.info("stripe event %s (%s): %s", event["id"], kind, outcome)
    return outcome

"""Stripe's webhook events, after their signature was verified (`api/billing.py`): each event id is acted on
once (a replayed delivery answers 200 and changes nothing), and each effect is also idempotent on its own
business key (a top-up credits once per Checkout Session, even if Stripe sends two different events for it).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session

from coordinator.db.tables import Book, StripeEventModel
from coordinator.services import ledger, payouts, topups
from coordinator.services.ledger import HOUSE
from coordinator.services.topups import MICROS_PER_CENT

log = logging.getLogger(__name__)


def _refund(session: Session, charge: dict[str, Any]) -> str:
    """`charge.refunded`: the refunded part of a top-up leaves the customer's available credit (which may go
    negative if it was spent) and goes back out through Stripe. Posted once per refund object."""
    metadata = charge.get("metadata") or {}
    account_id = metadata.get("tunegrid_account_id")
    if not account_id:
        return "not a top-up"
    done = 0
    for refund in (charge.get("refunds") or {}).get("data") or []:
        posted = ledger.move(
            session=session, key=f"refund:{refund['id']}", kind="refund", amount=int(refund["amount"]) * MICROS_PER_CENT,
            frm=(Book.customer_available, account_id), to=(Book.stripe_clearing, HOUSE),
            description=f"Refund {refund['id']} of top-up {metadata.get('tunegrid_topup_id', '')} to the card",
            account_id=account_id)
        done += posted is not None
    return f"{done} refunds"


def handle_event(*, session: Session, event: dict[str, Any]) -> str:
    """Act on one verified event; what was done, for the reply and the log."""
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
    elif kind == "account.updated":
        outcome = payouts.account_updated(session=session, stripe_account=obj)
    elif kind == "transfer.reversed":
        outcome = payouts.transfer_reversed(session=session, transfer=obj)
    elif kind == "charge.refunded":
        outcome = _refund(session, obj)
    else:
        outcome = "ignored"
    session.commit()
    log.info("stripe event %s (%s): %s", event["id"], kind, outcome)
    return outcome

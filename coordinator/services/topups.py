"""Prepaid top-ups through Stripe Checkout: a top-up opens a Checkout Session; Stripe's signed webhook for the
paid session credits the customer, once (`stripe_sync.py` hands it here).

Stripe charges whole cents, so amounts are whole cents from $5 to $10,000. A client may send an
`Idempotency-Key`: the same key returns the same top-up (and its Checkout URL) instead of opening another.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from coordinator.db.ids import new_id
from coordinator.db.tables import AccountModel, Book, OutboxModel, OutboxStatus, TopupModel, TopupStatus, utcnow
from coordinator.services import ledger, outbox
from coordinator.services.ledger import HOUSE
from coordinator.services.paging import page
from coordinator.settings import CoordinatorSettings
from coordinator.stripe_gateway import StripeGateway, StripeRefused, payments_not_configured
from shared.errors import BadGateway, InvalidRequest
from shared.money import MICROS_PER_CENT, micros_to_usd, usd_to_micros

MIN_TOPUP = usd_to_micros("5")
MAX_TOPUP = usd_to_micros("10000")


def prepare(
    *, session: Session, account: AccountModel, amount: int, request_key: str | None, settings: CoordinatorSettings,
    gateway: StripeGateway | None,
) -> tuple[str, str | None]:
    """Find or open the top-up, its Checkout Session call committed to the outbox: (top-up id, the outbox row
    still to send, if any). The caller sends it (outside any session) and reads the result with `checked`."""
    if gateway is None:
        raise payments_not_configured()
    if not MIN_TOPUP <= amount <= MAX_TOPUP or amount % MICROS_PER_CENT:
        raise InvalidRequest(f"A top-up is whole cents from ${micros_to_usd(MIN_TOPUP)} to "
                             f"${micros_to_usd(MAX_TOPUP)}.", param="amount", code="invalid_amount")
    topup = _existing(session, account, request_key)
    if topup is None:
        topup_id = new_id("topup-")
        topup = TopupModel(id=topup_id, account_id=account.id, amount=amount, status=TopupStatus.pending,
                           request_key=request_key or topup_id)
        session.add(topup)
        outbox.enqueue(session=session, operation="checkout.session.create", key=f"topup-{topup_id}",
                       subject_id=topup_id, params=_checkout_params(topup, settings))
        try:
            session.commit()
        except IntegrityError:  # the same key, concurrently: answer with the one that won
            session.rollback()
            topup = _existing(session, account, request_key)
            assert topup is not None
    if topup.amount != amount:
        raise InvalidRequest("This Idempotency-Key was used for a top-up of a different amount.",
                             param="Idempotency-Key", code="idempotency_key_reused")
    row_id = session.scalar(select(OutboxModel.id).where(OutboxModel.subject_id == topup.id,
                                                         OutboxModel.status == OutboxStatus.pending))
    result = (topup.id, row_id)
    session.commit()
    return result


def checked(*, session: Session, account: AccountModel, topup_id: str) -> TopupModel:
    """The top-up after its Checkout Session call: refused (400) or unanswered (502) are errors."""
    topup = session.get(TopupModel, topup_id)
    assert topup is not None and topup.account_id == account.id
    session.commit()
    if topup.status is TopupStatus.failed:
        raise InvalidRequest(f"Stripe refused the top-up: {topup.failure}", param="amount", code="topup_refused")
    if topup.status is TopupStatus.pending and topup.checkout_url is None:
        raise BadGateway("Stripe did not answer in time; nothing was charged. Retry with the same Idempotency-Key.")
    return topup


def _existing(session: Session, account: AccountModel, request_key: str | None) -> TopupModel | None:
    if request_key is None:
        return None
    return session.scalars(select(TopupModel).where(TopupModel.account_id == account.id,
                                                    TopupModel.request_key == request_key)).first()


def _checkout_params(topup: TopupModel, settings: CoordinatorSettings) -> dict:  # type: ignore[type-arg]
    metadata = {"tunegrid_topup_id": topup.id, "tunegrid_account_id": topup.account_id}
    return {
        "mode": "payment",
        "line_items": [{"quantity": 1, "price_data": {
            "currency": "usd", "unit_amount": topup.amount // MICROS_PER_CENT,
            "product_data": {"name": "tunegrid prepaid credit"}}}],
        "client_reference_id": topup.id,
        "metadata": metadata,
        "payment_intent_data": {"metadata": metadata},
        "success_url": f"{settings.public_url.rstrip('/')}/billing/topups/{topup.id}?result=success",
        "cancel_url": f"{settings.public_url.rstrip('/')}/billing/topups/{topup.id}?result=cancelled",
    }


def on_checkout_session(*, session: Session, row, result, refused: StripeRefused | None) -> None:  # type: ignore[no-untyped-def]
    topup = session.get(TopupModel, row.subject_id, with_for_update=True)
    if topup is None or topup.status is not TopupStatus.pending:
        return
    if result is not None:
        topup.stripe_session_id, topup.checkout_url = result["id"], result.get("url")
    else:
        topup.status, topup.failure = TopupStatus.failed, str(refused)


def credit_paid_session(*, session: Session, stripe_session: dict) -> str:  # type: ignore[type-arg]
    """A paid Checkout Session (from a verified webhook): credit what Stripe says was paid, once per session."""
    metadata = stripe_session.get("metadata") or {}
    topup = session.scalars(select(TopupModel).where(
        TopupModel.stripe_session_id == stripe_session["id"]).with_for_update()).first()
    if topup is None and metadata.get("tunegrid_topup_id"):  # the webhook beat our own record of the session
        topup = session.get(TopupModel, metadata["tunegrid_topup_id"], with_for_update=True)
    if topup is None:
        return "unknown session"
    if stripe_session.get("payment_status") != "paid":
        return "not paid yet"
    paid = int(stripe_session.get("amount_total") or 0) * MICROS_PER_CENT
    posted = ledger.move(
        session=session, key=f"topup:{stripe_session['id']}", kind="topup", amount=paid,
        frm=(Book.stripe_clearing, HOUSE), to=(Book.customer_available, topup.account_id),
        description=f"Top-up {topup.id} paid through Stripe", account_id=topup.account_id)
    topup.status, topup.paid_at = TopupStatus.paid, topup.paid_at or utcnow()
    topup.stripe_session_id = topup.stripe_session_id or stripe_session["id"]
    return "credited" if posted else "already credited"


def expire_session(*, session: Session, stripe_session: dict) -> str:  # type: ignore[type-arg]
    topup = session.scalars(select(TopupModel).where(
        TopupModel.stripe_session_id == stripe_session["id"]).with_for_update()).first()
    if topup is None or topup.status is not TopupStatus.pending:
        return "ignored"
    topup.status = TopupStatus.expired
    return "expired"


def refund_charge(*, session: Session, charge: dict) -> str:  # type: ignore[type-arg]
    """`charge.refunded`: the refunded part of a top-up leaves the customer's available credit (which may go
    negative if it was spent) and goes back out through Stripe. Posted once per refund object."""
    metadata = charge.get("metadata") or {}
    account_id = metadata.get("tunegrid_account_id")
    if not account_id:
        return "not a top-up"
    refunds = (charge.get("refunds") or {}).get("data") if isinstance(charge.get("refunds"), dict) else None
    if not isinstance(refunds, list) or not all(
            isinstance(r, dict) and isinstance(r.get("id"), str) and type(r.get("amount")) is int and r["amount"] > 0
            for r in refunds):
        raise InvalidRequest("charge.refunded without a list of refunds, each with an id and a positive amount.",
                             code="invalid_payload")
    done = 0
    for refund in refunds:
        posted = ledger.move(
            session=session, key=f"refund:{refund['id']}", kind="refund", amount=int(refund["amount"]) * MICROS_PER_CENT,
            frm=(Book.customer_available, account_id), to=(Book.stripe_clearing, HOUSE),
            description=f"Refund {refund['id']} of top-up {metadata.get('tunegrid_topup_id', '')} to the card",
            account_id=account_id)
        done += posted is not None
    return f"{done} refunds"


def list_topups(*, session: Session, account: AccountModel, after: str | None, limit: int) -> tuple[list[TopupModel], bool]:
    rows = page(session=session, stmt=select(TopupModel).where(TopupModel.account_id == account.id),
                id_column=TopupModel.id, after=after, limit=limit)
    session.commit()
    return rows

"""What Stripe says, handed one way (a local fake of Stripe's API; Stripe itself cannot be reached from here):
an answer to an outbox call reaches its top-up; a verified webhook event is acted on once per event id, and
each effect once per business key (a paid Checkout Session credits once, a refund posts once). Signature
checks are the API's (tests/coordinator/api/test_webhooks.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, Book, OutboxModel, OutboxStatus, StripeEventModel, TopupModel, TopupStatus
from coordinator.services import ledger, outbox, stripe_sync, topups
from coordinator.services.outbox import Answer
from coordinator.settings import CoordinatorSettings
from coordinator.stripe_gateway import StripeGateway, StripeRefused
from shared.money import usd_to_micros


@pytest.fixture
def gateway(stripe_settings: CoordinatorSettings) -> StripeGateway:
    return StripeGateway(stripe_settings)


@pytest.fixture
def payer(session: Session, make_caller) -> AccountModel:  # type: ignore[no-untyped-def]
    account = session.get(AccountModel, make_caller("customer", "carol", credit=None).account_id)
    assert account is not None
    return account


def opened(session: Session, payer: AccountModel, settings: CoordinatorSettings, gateway: StripeGateway,
           usd: str = "20") -> TopupModel:
    """A top-up whose Checkout Session call went through the outbox to the fake Stripe."""
    topup_id, row_id = topups.prepare(session=session, account=payer, amount=usd_to_micros(usd), request_key=None,
                                      settings=settings, gateway=gateway)
    assert row_id is not None
    assert stripe_sync.send(session=session, gateway=gateway, row_id=row_id).status is OutboxStatus.done
    topup = session.get(TopupModel, topup_id)
    assert topup is not None and topup.stripe_session_id and topup.checkout_url
    return topup


def event(kind: str, obj: dict[str, Any], event_id: str) -> dict[str, Any]:
    return {"id": event_id, "type": kind, "data": {"object": obj}}


def available(session: Session, account: AccountModel) -> int:
    return ledger.balance(session, Book.customer_available, account.id)


def test_an_answer_reaches_its_top_up_and_a_refusal_fails_it(session: Session, payer: AccountModel,
                                                            stripe_settings: CoordinatorSettings, gateway: StripeGateway) -> None:
    topup = opened(session, payer, stripe_settings, gateway)
    assert topup.status is TopupStatus.pending and topup.checkout_url.startswith("https://")  # type: ignore[union-attr]

    topup_id, row_id = topups.prepare(session=session, account=payer, amount=usd_to_micros("7"), request_key=None,
                                      settings=stripe_settings, gateway=gateway)
    assert row_id is not None
    refused = StripeRefused("Your card was declined", code="card_declined")
    row = stripe_sync.record_answer(session=session, row_id=row_id, answer=Answer(refused=refused, error="refused"))
    assert row.status is OutboxStatus.failed
    declined = session.get(TopupModel, topup_id)
    assert declined is not None and declined.status is TopupStatus.failed and "declined" in (declined.failure or "")


def test_a_paid_session_credits_once_whatever_stripe_sends(session: Session, payer: AccountModel, stripe_server,  # type: ignore[no-untyped-def]
                                                          stripe_settings: CoordinatorSettings, gateway: StripeGateway) -> None:
    topup = opened(session, payer, stripe_settings, gateway)
    paid = stripe_server.pay(topup.stripe_session_id)
    assert stripe_sync.handle_event(session=session, event=event("checkout.session.completed", paid, "evt_1")) == "credited"
    assert stripe_sync.handle_event(session=session, event=event("checkout.session.completed", paid, "evt_1")) == "duplicate"
    again = stripe_sync.handle_event(session=session, event=event("checkout.session.async_payment_succeeded", paid, "evt_2"))
    assert again == "already credited"
    assert available(session, payer) == usd_to_micros("20")
    session.refresh(topup)
    assert topup.status is TopupStatus.paid and topup.paid_at is not None


def test_the_amount_credited_is_what_stripe_says_was_paid(session: Session, payer: AccountModel, stripe_server,  # type: ignore[no-untyped-def]
                                                          stripe_settings: CoordinatorSettings, gateway: StripeGateway) -> None:
    topup = opened(session, payer, stripe_settings, gateway)
    paid = {**stripe_server.pay(topup.stripe_session_id), "amount_total": 1500}  # Stripe's figure, in cents
    stripe_sync.handle_event(session=session, event=event("checkout.session.completed", paid, "evt_1"))
    assert available(session, payer) == usd_to_micros("15")


def test_an_unpaid_or_expired_session_credits_nothing(session: Session, payer: AccountModel, stripe_server,  # type: ignore[no-untyped-def]
                                                      stripe_settings: CoordinatorSettings, gateway: StripeGateway) -> None:
    topup = opened(session, payer, stripe_settings, gateway)
    unpaid = {**stripe_server.sessions[topup.stripe_session_id], "payment_status": "unpaid"}
    assert stripe_sync.handle_event(session=session, event=event("checkout.session.completed", unpaid, "evt_1")) == "not paid yet"
    assert stripe_sync.handle_event(session=session, event=event("checkout.session.expired", unpaid, "evt_2")) == "expired"
    session.refresh(topup)
    assert topup.status is TopupStatus.expired and available(session, payer) == 0
    unknown = {"id": "cs_nobody", "payment_status": "paid", "amount_total": 500}
    assert stripe_sync.handle_event(session=session, event=event("checkout.session.completed", unknown, "evt_3")) == "unknown session"


def test_each_refund_of_a_top_up_leaves_the_balance_once(session: Session, payer: AccountModel, stripe_server,  # type: ignore[no-untyped-def]
                                                         stripe_settings: CoordinatorSettings, gateway: StripeGateway) -> None:
    topup = opened(session, payer, stripe_settings, gateway)
    stripe_sync.handle_event(session=session, event=event("checkout.session.completed",
                                                          stripe_server.pay(topup.stripe_session_id), "evt_1"))
    charge = {"id": "ch_1", "metadata": {"tunegrid_account_id": payer.id, "tunegrid_topup_id": topup.id},
              "refunds": {"data": [{"id": "re_1", "amount": 500}]}}
    assert stripe_sync.handle_event(session=session, event=event("charge.refunded", charge, "evt_2")) == "1 refunds"
    more = {**charge, "refunds": {"data": [{"id": "re_1", "amount": 500}, {"id": "re_2", "amount": 300}]}}
    assert stripe_sync.handle_event(session=session, event=event("charge.refunded", more, "evt_3")) == "1 refunds"
    assert available(session, payer) == usd_to_micros("12")
    assert stripe_sync.handle_event(session=session, event=event("charge.refunded", {"id": "ch_2"}, "evt_4")) == "not a top-up"


def test_an_event_of_another_kind_is_recorded_and_ignored(session: Session) -> None:
    assert stripe_sync.handle_event(session=session, event=event("customer.created", {"id": "cus_1"}, "evt_1")) == "ignored"
    assert session.scalar(select(func.count()).select_from(StripeEventModel)) == 1
    assert stripe_sync.handle_event(session=session, event=event("customer.created", {"id": "cus_1"}, "evt_1")) == "duplicate"


def test_send_due_answers_what_an_outage_left_pending(session: Session, payer: AccountModel,
                                                      stripe_settings: CoordinatorSettings, gateway: StripeGateway) -> None:
    topup_id, row_id = topups.prepare(session=session, account=payer, amount=usd_to_micros("9"), request_key=None,
                                      settings=stripe_settings, gateway=gateway)
    assert row_id is not None
    stripe_sync.record_answer(session=session, row_id=row_id, answer=Answer(error="Stripe timed out"))
    row = session.get(OutboxModel, row_id)
    assert row is not None and row.status is OutboxStatus.pending
    assert stripe_sync.send_due(session=session, gateway=gateway) == 0  # not due yet: backing off
    row.next_attempt_at = row.created_at
    session.commit()
    assert stripe_sync.send_due(session=session, gateway=gateway) == 1
    topup = session.get(TopupModel, topup_id)
    assert topup is not None and topup.checkout_url and json.dumps(outbox.due(session=session)) == "[]"

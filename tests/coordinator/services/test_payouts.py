"""Provider payouts through Stripe Connect (a local fake of Stripe): onboarding, payouts on a schedule above a
minimum, and the outbox: a crash between Stripe's transfer and our record of it makes one transfer, not two;
a refused or reversed transfer puts the money back in payable; without a Stripe key payouts stay pending."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.tables import Book, OutboxModel, OutboxStatus, PayoutModel, PayoutStatus
from coordinator.services import ledger, payouts, stripe_sync
from coordinator.services.ledger import HOUSE, Entry
from coordinator.settings import CoordinatorSettings
from coordinator.stripe_gateway import StripeGateway
from shared.money import usd_to_micros
from tests.coordinator.api.conftest import deliver


@pytest.fixture
def provider(make_caller):  # type: ignore[no-untyped-def]
    return make_caller("provider", "pat")


def earn(session: Session, provider_id: str, usd: str, key: str = "earned") -> None:
    amount = usd_to_micros(usd)
    ledger.post(session=session, key=key, kind="settle", description="test earnings", entries=[
        Entry(Book.provider_payable, provider_id, amount), Entry(Book.platform_revenue, HOUSE, -amount)])
    session.commit()


def onboarded(client: TestClient, stripe_server, provider) -> str:  # type: ignore[no-untyped-def]
    """The provider's Connect account, onboarding finished and reported by Stripe's webhook."""
    body = client.post("/v1/providers/me/payout-account", headers=provider.headers).json()
    account_id = body["stripe_account_id"]
    event = stripe_server.event("account.updated", stripe_server.finish_onboarding(account_id))
    assert deliver(client, event).json()["outcome"] == "updated"
    return account_id


def test_onboarding_makes_one_connect_account_and_fresh_links(
    stripe_client: TestClient, stripe_server, provider,  # type: ignore[no-untyped-def]
) -> None:
    first = stripe_client.post("/v1/providers/me/payout-account", headers=provider.headers)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["stripe_account_id"].startswith("acct_") and body["payouts_enabled"] is False
    assert body["onboarding_url"].startswith("https://connect.stripe.test/setup/")
    second = stripe_client.post("/v1/providers/me/payout-account", headers=provider.headers).json()
    assert second["stripe_account_id"] == body["stripe_account_id"] and len(stripe_server.accounts) == 1
    earnings = stripe_client.get("/v1/providers/me/earnings", headers=provider.headers).json()
    assert earnings["payouts_enabled"] is False
    event = stripe_server.event("account.updated", stripe_server.finish_onboarding(body["stripe_account_id"]))
    assert deliver(stripe_client, event).json()["outcome"] == "updated"
    assert stripe_client.get("/v1/providers/me/earnings", headers=provider.headers).json()["payouts_enabled"] is True


def test_payouts_transfer_what_is_due_above_the_minimum(
    stripe_client: TestClient, stripe_server, stripe_settings: CoordinatorSettings, session: Session, provider,  # type: ignore[no-untyped-def]
) -> None:
    destination = onboarded(stripe_client, stripe_server, provider)
    gateway = StripeGateway(stripe_settings)
    earn(session, provider.account_id, "0.50")  # under the $1.00 minimum: nothing yet
    assert stripe_sync.run_payouts(session=session, settings=stripe_settings, gateway=gateway) == 0
    earn(session, provider.account_id, "12.345678", key="more")
    assert stripe_sync.run_payouts(session=session, settings=stripe_settings, gateway=gateway) == 1
    [transfer] = stripe_server.transfers.values()
    assert (transfer["amount"], transfer["destination"], transfer["currency"]) == (1284, destination, "usd")
    assert ledger.balance(session, Book.provider_payable, provider.account_id) == 5_678  # the sub-cent rest waits
    body = stripe_client.get("/v1/providers/me/earnings", headers=provider.headers).json()
    assert body["paid_out"] == "12.840000" and body["payable"] == "0.005678"
    assert body["payouts"][0]["status"] == "paid" and body["payouts"][0]["stripe_transfer_id"] == transfer["id"]
    assert stripe_sync.run_payouts(session=session, settings=stripe_settings, gateway=gateway) == 0  # nothing twice
    assert len(stripe_server.transfers) == 1 and ledger.audit(session).ok


def test_a_crash_between_stripes_transfer_and_our_record_makes_one_transfer(
    stripe_client: TestClient, stripe_server, stripe_settings: CoordinatorSettings, session: Session, provider,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    onboarded(stripe_client, stripe_server, provider)
    gateway = StripeGateway(stripe_settings)
    earn(session, provider.account_id, "25")
    [row_id] = payouts.create_payouts(session=session, settings=stripe_settings)  # committed: payout + outbox row

    real = payouts.on_transfer

    def crash(**kwargs):  # type: ignore[no-untyped-def]
        raise SystemExit("the coordinator died after Stripe made the transfer")

    monkeypatch.setattr(payouts, "on_transfer", crash)
    with pytest.raises(SystemExit):
        stripe_sync.send(session=session, gateway=gateway, row_id=row_id)
    session.rollback()
    assert len(stripe_server.transfers) == 1  # Stripe did it; we never recorded it
    row = session.get(OutboxModel, row_id)
    assert row is not None and row.status is OutboxStatus.pending

    monkeypatch.setattr(payouts, "on_transfer", real)
    row.next_attempt_at = row.created_at  # due now (the retry sweep would find it after its backoff)
    session.commit()
    assert stripe_sync.send_due(session=session, gateway=gateway) == 1  # the same idempotency key, replayed
    assert len(stripe_server.transfers) == 1
    payout = session.scalars(select(PayoutModel)).one()
    assert payout.status is PayoutStatus.paid and payout.stripe_transfer_id in stripe_server.transfers
    keys = [key for method, path, key in stripe_server.requests if path == "/v1/transfers"]
    assert keys == [f"payout-{payout.id}"] * 2
    assert ledger.balance(session, Book.provider_payable, provider.account_id) == 0 and ledger.audit(session).ok


def test_a_lost_reply_is_retried_by_the_sdk_with_the_same_key(
    stripe_client: TestClient, stripe_server, stripe_settings: CoordinatorSettings, session: Session, provider,  # type: ignore[no-untyped-def]
) -> None:
    onboarded(stripe_client, stripe_server, provider)
    earn(session, provider.account_id, "3")
    stripe_server.drop_next = 1  # Stripe makes the transfer, the connection drops before its answer
    assert stripe_sync.run_payouts(session=session, settings=stripe_settings, gateway=StripeGateway(stripe_settings)) == 1
    assert len(stripe_server.transfers) == 1
    assert session.scalars(select(PayoutModel)).one().status is PayoutStatus.paid


def test_a_refused_transfer_puts_the_money_back(
    stripe_client: TestClient, stripe_server, stripe_settings: CoordinatorSettings, session: Session, provider,  # type: ignore[no-untyped-def]
) -> None:
    account_id = onboarded(stripe_client, stripe_server, provider)
    stripe_server.accounts[account_id]["capabilities"] = {"transfers": "inactive"}  # Stripe disabled it meanwhile
    earn(session, provider.account_id, "3")
    stripe_sync.run_payouts(session=session, settings=stripe_settings, gateway=StripeGateway(stripe_settings))
    payout = session.scalars(select(PayoutModel)).one()
    assert payout.status is PayoutStatus.failed and "capabilities" in (payout.failure or "")
    assert ledger.balance(session, Book.provider_payable, provider.account_id) == usd_to_micros("3")
    assert stripe_server.transfers == {} and ledger.audit(session).ok


def test_a_reversed_transfer_puts_the_money_back(
    stripe_client: TestClient, stripe_server, stripe_settings: CoordinatorSettings, session: Session, provider,  # type: ignore[no-untyped-def]
) -> None:
    onboarded(stripe_client, stripe_server, provider)
    earn(session, provider.account_id, "3")
    stripe_sync.run_payouts(session=session, settings=stripe_settings, gateway=StripeGateway(stripe_settings))
    [transfer] = stripe_server.transfers.values()
    event = stripe_server.event("transfer.reversed", {**transfer, "reversed": True, "amount_reversed": 300})
    assert deliver(stripe_client, event).json()["outcome"] == "reversed"
    session.expire_all()
    assert session.scalars(select(PayoutModel)).one().status is PayoutStatus.reversed
    assert ledger.balance(session, Book.provider_payable, provider.account_id) == usd_to_micros("3")


def test_without_stripe_payouts_stay_pending(client: TestClient, session: Session, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
                                             provider) -> None:
    earn(session, provider.account_id, "50")
    assert payouts.create_payouts(session=session, settings=settings) == []
    assert stripe_sync.run_payouts(session=session, settings=settings, gateway=None) == 0
    body = client.get("/v1/providers/me/earnings", headers=provider.headers).json()
    assert body["payable"] == "50.000000" and body["payouts_enabled"] is False and body["payouts"] == []
    refused = client.post("/v1/providers/me/payout-account", headers=provider.headers)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "payments_not_configured"

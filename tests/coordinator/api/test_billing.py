"""`/v1/billing` over HTTP: balance, usage per job and per day, transactions, and top-ups through Stripe Checkout
(a local fake of Stripe) credited by a signed webhook once. The services: tests/coordinator/services/test_topups.py
and test_stripe_sync.py; the webhook's signature checks: test_webhooks.py."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from coordinator.db.tables import Book
from coordinator.services import ledger
from shared.money import usd_to_micros
from tests.coordinator.api.conftest import deliver, topup
from tests.fakes import FakeAgent



def test_balance_and_transactions_show_the_grant_and_the_hold(client: TestClient, customer, create_job) -> None:  # type: ignore[no-untyped-def]
    balance = client.get("/v1/billing/balance", headers=customer.headers).json()
    assert balance == {"object": "billing.balance", "currency": "usd", "available": "100.000000",
                       "held": "0.000000", "topups_enabled": False}
    job = create_job().json()
    after = client.get("/v1/billing/balance", headers=customer.headers).json()
    assert after["held"] == job["cost_held"] and usd_to_micros(after["available"]) + usd_to_micros(after["held"]) == usd_to_micros("100")
    page = client.get("/v1/billing/transactions?limit=1", headers=customer.headers).json()
    assert page["has_more"] is True and page["data"][0]["type"] == "hold" and page["data"][0]["job_id"] == job["id"]
    assert page["data"][0]["held"] == job["cost_held"] and page["data"][0]["available"] == f"-{job['cost_held']}"
    rest = client.get(f"/v1/billing/transactions?after={page['data'][0]['id']}", headers=customer.headers).json()
    assert [t["type"] for t in rest["data"]] == ["grant"] and rest["has_more"] is False


def test_usage_per_job_and_per_day_with_gpu_class_and_rate(
    client: TestClient, customer, make_caller, create_job,  # type: ignore[no-untyped-def]
) -> None:
    provider = make_caller("provider", "pat")
    agent = FakeAgent.register(client, provider.key)
    job = create_job().json()
    a = agent.claim(wait_s=2)
    assert a is not None and agent.finish(a["lease_id"]).status_code == 200
    per_job = client.get("/v1/billing/usage?group_by=job", headers=customer.headers).json()
    assert per_job["group_by"] == "job" and len(per_job["data"]) == 1
    row = per_job["data"][0]
    assert row["job_id"] == job["id"] and row["gpu_class"] == "rtx-4090" and row["price_per_gpu_hour"] == "0.360000"
    assert row["leases"] == 1 and row["cost"] == client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=customer.headers).json()["cost"]
    per_day = client.get("/v1/billing/usage", headers=customer.headers).json()
    assert per_day["group_by"] == "day" and per_day["data"][0]["date"] == time.strftime("%Y-%m-%d", time.gmtime())
    assert client.get("/v1/billing/usage?group_by=week", headers=customer.headers).status_code == 400
    assert client.get("/v1/billing/usage?start=2026-02-01&end=2026-01-01", headers=customer.headers).status_code == 400
    assert client.get("/v1/billing/usage?start=yesterday", headers=customer.headers).status_code == 400


def test_without_stripe_top_ups_say_so(client: TestClient, customer) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/v1/billing/topups", headers=customer.headers, json={"amount": "20"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "payments_not_configured"


def test_billing_needs_a_key_and_the_right_role(client: TestClient, make_caller) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/v1/billing/balance").status_code == 401
    provider = make_caller("provider", "pat")
    assert client.get("/v1/billing/balance", headers=provider.headers).status_code == 403
    assert client.get("/v1/providers/me/earnings", headers=provider.headers).json()["payable"] == "0.000000"


# --- with Stripe (the local fake) -----------------------------------------------------------------

def test_a_top_up_opens_a_checkout_session_and_the_signed_webhook_credits_it_once(
    stripe_client: TestClient, stripe_server, paying, session: Session,  # type: ignore[no-untyped-def]
) -> None:
    created = topup(stripe_client, paying, key="order-1")
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["status"] == "pending" and body["amount"] == "20.000000"
    assert body["checkout_url"].startswith("https://checkout.stripe.test/")
    [stripe_session] = stripe_server.sessions.values()
    assert stripe_session["amount_total"] == 2000 and stripe_session["client_reference_id"] == body["id"]
    assert stripe_session["metadata"]["tunegrid_account_id"] == paying.account_id
    again = topup(stripe_client, paying, key="order-1").json()  # the same Idempotency-Key: the same top-up
    assert again["id"] == body["id"] and len(stripe_server.sessions) == 1
    assert topup(stripe_client, paying, amount="30", key="order-1").status_code == 400

    event = stripe_server.event("checkout.session.completed", stripe_server.pay(stripe_session["id"]))
    first = deliver(stripe_client, event)
    assert first.status_code == 200 and first.json()["outcome"] == "credited"
    replay = deliver(stripe_client, event)  # Stripe redelivers the same event
    assert replay.status_code == 200 and replay.json()["outcome"] == "duplicate"
    other = stripe_server.event("checkout.session.async_payment_succeeded", stripe_server.sessions[stripe_session["id"]])
    assert deliver(stripe_client, other).json()["outcome"] == "already credited"  # another event, same session
    balance = stripe_client.get("/v1/billing/balance", headers=paying.headers).json()
    assert balance["available"] == "20.000000" and balance["topups_enabled"] is True
    listed = stripe_client.get("/v1/billing/topups", headers=paying.headers).json()["data"]
    assert [(t["id"], t["status"], t["checkout_url"]) for t in listed] == [(body["id"], "paid", None)]
    assert ledger.balance(session, Book.stripe_clearing) == -usd_to_micros("20")
    assert ledger.audit(session).ok


@pytest.mark.parametrize("amount", ["4.99", "10000.01", "20.001", "-5", "abc"])
def test_top_up_amounts_are_whole_cents_within_limits(stripe_client: TestClient, paying, amount: str) -> None:  # type: ignore[no-untyped-def]
    response = topup(stripe_client, paying, amount=amount)
    assert response.status_code == 400, response.text


def test_stripe_down_answers_502_and_the_same_key_succeeds_later(
    stripe_client: TestClient, stripe_server, paying,  # type: ignore[no-untyped-def]
) -> None:
    stripe_server.fail_next = [500, 500, 500]  # the first call and both SDK retries
    down = topup(stripe_client, paying, key="order-2")
    assert down.status_code == 502 and down.json()["error"]["code"] == "upstream_error"
    assert stripe_server.sessions == {}
    up = topup(stripe_client, paying, key="order-2")
    assert up.status_code == 200 and len(stripe_server.sessions) == 1

"""A job end to end with its money, against a real coordinator process (PostgreSQL), the real agent and trainer,
and a local fake of Stripe: the customer tops up through Checkout (credited by a signed webhook), the agent
(whose wall clock is ten minutes off) trains the job and reports its progress, the adapter is downloadable, the
lease settles on the coordinator's clock: the customer is charged `seconds * (ask + fee) / 3600` to the
micro-dollar, the provider's payable is `seconds * ask / 3600`, the ledger sums to zero, and the scheduled
payout transfers the provider's earnings to its Stripe Connect account."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from shared.money import usd_to_micros
from tests.conftest import WEBHOOK_SECRET
from tests.e2e.conftest import LiveServer
from tests.e2e.test_agent import registered_agent, run_until_done, submit, worker_settings
from tests.stripe_fake import FakeStripe, sign

ASK = usd_to_micros("90")  # per GPU-hour: dear, so a short CPU job earns whole cents to pay out
PRICE = usd_to_micros("108")  # with the 20% fee


@pytest.fixture
def stripe_server():  # type: ignore[no-untyped-def]
    fake = FakeStripe().start()
    yield fake
    fake.stop()


@pytest.fixture
def live_env(stripe_server: FakeStripe) -> dict[str, str]:
    return {"TUNEGRID_STRIPE_API_KEY": stripe_server.api_key, "TUNEGRID_STRIPE_API_BASE": stripe_server.url,
            "TUNEGRID_STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET, "TUNEGRID_MIN_PAYOUT_USD": "0.01",
            "TUNEGRID_PAYOUT_INTERVAL_S": "1", "TUNEGRID_SWEEP_INTERVAL_S": "0.5"}


def webhook(server: LiveServer, payload: bytes) -> dict:  # type: ignore[type-arg]
    response = httpx.post(f"{server.url}/webhooks/stripe", content=payload, timeout=10,
                          headers={"Stripe-Signature": sign(payload, WEBHOOK_SECRET), "Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.live
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)  # the money path on the production database; services test both
def test_top_up_train_settle_and_pay_out(live_server: LiveServer, stripe_server: FakeStripe, tmp_path: Path,
                                          tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    provider_key = live_server.new_key("provider", "pat")
    settings = worker_settings(tmp_path, tiny_model)
    agent = registered_agent(live_server, settings, monkeypatch, price="90", provider_key=provider_key)
    provider = httpx.Client(base_url=live_server.url, timeout=30, headers={"Authorization": f"Bearer {provider_key}"})
    account = provider.post("/v1/providers/me/payout-account").json()
    assert account["onboarding_url"].startswith("https://connect.stripe.test/")
    assert webhook(live_server, stripe_server.event("account.updated", stripe_server.finish_onboarding(
        account["stripe_account_id"])))["outcome"] == "updated"

    customer_key = live_server.new_key("customer", "alice", credit="")
    with httpx.Client(base_url=live_server.url, headers={"Authorization": f"Bearer {customer_key}"}, timeout=30) as client:
        created = client.post("/v1/billing/topups", json={"amount": "20.00"}, headers={"Idempotency-Key": "t1"}).json()
        [session] = stripe_server.sessions.values()
        assert created["checkout_url"] == session["url"]
        assert webhook(live_server, stripe_server.event("checkout.session.completed",
                                                        stripe_server.pay(session["id"])))["outcome"] == "credited"
        assert client.get("/v1/billing/balance").json()["available"] == "20.000000"

        real_time = time.time  # from here on the worker's clock (and this test's) is ten minutes fast
        monkeypatch.setattr(time, "time", lambda: real_time() + 600)
        started = time.monotonic()
        job = submit(client, examples=120, hyperparameters={"n_epochs": 2}, lora={"r": 8},  # about a second of training
                     max_price_per_gpu_hour="120")  # this dear worker is above the market's default cap (README)
        assert usd_to_micros(job["cost_held"]) > 0
        done = run_until_done(agent, client, job["id"])
        elapsed = time.monotonic() - started
        assert done["status"] == "succeeded", done
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=200").json()["data"]
        metrics = [e for e in events if e["type"] == "metrics" and "valid_loss" not in e["data"]]
        assert metrics and all("train_loss" in e["data"] for e in metrics if "step" in e["data"])
        [adapter_file] = done["result_files"]
        archive = client.get(f"/v1/files/{adapter_file}/content")
        assert archive.status_code == 200 and archive.content[:2] == b"\x1f\x8b"  # the PEFT adapter, gzipped
        assert agent.status.jobs_done == 1 and agent.status.earned_micros > 0  # the ask times the wall time
        assert not settings.state_path.exists() and not any(settings.jobs_dir.iterdir())  # nothing left behind

        [usage] = client.get("/v1/billing/usage?group_by=job").json()["data"]
        seconds = usage["seconds"]
        assert 1 <= seconds <= elapsed + 1 and usage["price_per_gpu_hour"] == "108.000000"  # nothing of the skew
        charge = -(-seconds * PRICE // 3600)  # rounded up to the micro-dollar
        earned = seconds * ASK // 3600  # rounded down
        assert usd_to_micros(usage["cost"]) == charge == usd_to_micros(done["cost"])
        balance = client.get("/v1/billing/balance").json()
        assert usd_to_micros(balance["available"]) == usd_to_micros("20") - charge and balance["held"] == "0.000000"

    # The scheduled payout (every second here) transfers the whole cents; the sub-cent rest stays payable.
    deadline = time.monotonic() + 30
    while True:
        earnings = provider.get("/v1/providers/me/earnings").json()
        if earnings["payouts"] and earnings["payouts"][0]["status"] == "paid" or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert usd_to_micros(earnings["lifetime_earned"]) == earned
    [payout] = earnings["payouts"]
    assert payout["status"] == "paid", earnings
    [transfer] = stripe_server.transfers.values()
    assert transfer["id"] == payout["stripe_transfer_id"] and transfer["destination"] == account["stripe_account_id"]
    assert transfer["amount"] == earned // 10_000 and usd_to_micros(earnings["payable"]) == earned % 10_000
    audit = live_server.cli("ledger", "audit")
    assert "postings total: 0 micro-dollars; unbalanced transactions: 0; drifted balances: 0" in audit
    provider.close()

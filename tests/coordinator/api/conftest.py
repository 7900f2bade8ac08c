"""Fixtures for the HTTP tests: a provider, its registered `FakeAgent` and a job placed on it (the worker
protocol); a paying customer, a top-up and a signed webhook delivery (billing, against the local Stripe fake)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.conftest import WEBHOOK_SECRET
from tests.stripe_fake import sign

from tests.fakes import FakeAgent

WEBHOOK = "/webhooks/stripe"


@pytest.fixture
def provider(make_caller):  # type: ignore[no-untyped-def]
    return make_caller("provider", "pat")


@pytest.fixture
def agent(client: TestClient, provider) -> FakeAgent:  # type: ignore[no-untyped-def]
    return FakeAgent.register(client, provider.key)


def job_of(client: TestClient, customer, job_id: str) -> dict:  # type: ignore[no-untyped-def, type-arg]
    return client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=customer.headers).json()


def placed(client: TestClient, agent: FakeAgent, create_job, **fields) -> tuple[dict, dict]:  # type: ignore[no-untyped-def, type-arg]
    job = create_job(**fields).json()
    assignment = agent.claim(wait_s=2)
    assert assignment is not None and assignment["job_id"] == job["id"]
    return job, assignment


@pytest.fixture
def paying(stripe_client: TestClient, make_caller):  # type: ignore[no-untyped-def]
    return make_caller("customer", "carol", credit=None)


def topup(client: TestClient, caller, amount: str = "20.00", key: str | None = None):  # type: ignore[no-untyped-def]
    headers = {**caller.headers, **({"Idempotency-Key": key} if key else {})}
    return client.post("/v1/billing/topups", headers=headers, json={"amount": amount})


def deliver(client: TestClient, payload: bytes, *, secret: str = WEBHOOK_SECRET, timestamp: int | None = None,
            header: str | None = None):  # type: ignore[no-untyped-def]
    signature = header if header is not None else sign(payload, secret, timestamp)
    return client.post(WEBHOOK, content=payload, headers={"Stripe-Signature": signature,
                                                          "Content-Type": "application/json"})

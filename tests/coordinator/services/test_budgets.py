"""Holds and budgets: a job is queued only against a hold (429 `insufficient_quota`, as OpenAI answers, when the
balance is short), a running job holds more as it goes, stops at its last checkpoint at max_cost, and pauses when the customer's credit runs
out; resuming holds again."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from coordinator.db.tables import Book, JobModel, LeaseModel, LeaseStatus, utcnow
from coordinator.services import billing, budgets, ledger
from coordinator.db.tables import AccountModel
from coordinator.settings import CoordinatorSettings
from shared.money import usd_to_micros
from tests.fakes import FakeAgent


@pytest.fixture
def provider(make_caller):  # type: ignore[no-untyped-def]
    return make_caller("provider", "pat")


def run_for(session: Session, job_id: str, lease_id: str, seconds: int) -> None:
    """As if the lease had been training for `seconds`, heard from just now."""
    now = utcnow()
    session.execute(update(LeaseModel).where(LeaseModel.id == lease_id).values(
        training_started_at=now - timedelta(seconds=seconds), last_renewed_at=now))
    session.execute(update(JobModel).where(JobModel.id == job_id).values(accruing_since=now - timedelta(seconds=seconds)))
    session.commit()


def start(client: TestClient, provider, create_job, **fields):  # type: ignore[no-untyped-def]
    agent = FakeAgent.register(client, provider.key)
    job = create_job(**fields).json()
    assert "id" in job, job
    a = agent.claim(wait_s=2)
    assert a is not None
    agent.progress(a["lease_id"], step=1)
    return agent, job, a["lease_id"]


def test_create_answers_429_insufficient_quota_when_the_balance_cannot_cover_the_hold(
    client: TestClient, make_caller, upload, session: Session,  # type: ignore[no-untyped-def]
) -> None:
    broke = make_caller("customer", "broke", credit=None)
    file_id = upload(broke).json()["id"]
    response = client.post("/v1/fine_tuning/jobs", headers=broke.headers,
                           json={"model": "tunegrid/tiny-llama", "training_file": file_id})
    assert response.status_code == 429  # OpenAI's answer to an account out of credit
    error = response.json()["error"]
    assert error["code"] == "insufficient_quota" and error["type"] == "insufficient_quota"
    assert "top up" in error["message"].lower()
    assert client.get("/v1/fine_tuning/jobs", headers=broke.headers).json()["data"] == []  # nothing was created


def test_a_queued_job_holds_its_estimate_with_a_margin_capped_by_max_cost(
    client: TestClient, session: Session, customer, create_job, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
) -> None:
    job = create_job(max_price_per_gpu_hour="2.00").json()
    held = usd_to_micros(job["cost_held"])
    assert held >= settings.min_hold
    assert ledger.balance(session, Book.customer_held, customer.account_id) == held
    assert ledger.balance(session, Book.customer_available, customer.account_id) == usd_to_micros("100") - held
    capped = create_job(max_cost="0.000500").json()
    assert capped["cost_held"] == "0.000500"
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=customer.headers).json()
    assert cancelled["cost_held"] == "0.000000"  # released in full: it never ran


def test_a_running_job_holds_more_as_it_goes(
    client: TestClient, session: Session, settings: CoordinatorSettings, provider, customer, create_job,  # type: ignore[no-untyped-def]
) -> None:
    _, job, lease_id = start(client, provider, create_job)
    before = session.get(JobModel, job["id"]).held_micros  # type: ignore[union-attr]
    run_for(session, job["id"], lease_id, 3600)  # $0.36 at the fake worker's price: more than the small hold
    assert budgets.enforce_budgets(session=session, settings=settings)["extended"] == 1
    session.expire_all()
    after = session.get(JobModel, job["id"])
    assert after is not None and after.held_micros > before and after.status.value == "running"
    body = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=customer.headers).json()
    assert usd_to_micros(body["cost"]) >= usd_to_micros("0.36")  # the running lease's time so far


def test_a_job_at_its_max_cost_stops_at_its_last_checkpoint(
    client: TestClient, session: Session, settings: CoordinatorSettings, provider, customer, create_job,  # type: ignore[no-untyped-def]
) -> None:
    agent, job, lease_id = start(client, provider, create_job, max_cost="0.10")
    assert agent.save_checkpoint(lease_id, 7).status_code == 200
    run_for(session, job["id"], lease_id, 990)  # $0.099 so far; the next sweeps would pass $0.10
    assert budgets.enforce_budgets(session=session, settings=settings)["stopped"] == 1
    body = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=customer.headers).json()
    assert body["status"] == "failed" and body["error"]["code"] == "max_cost_reached"
    assert "step 7" in body["error"]["message"]
    assert usd_to_micros(body["cost"]) <= usd_to_micros("0.10") and body["cost_held"] == "0.000000"
    session.expire_all()
    assert session.get(LeaseModel, lease_id).status is LeaseStatus.cancelled  # type: ignore[union-attr]
    beat = agent.heartbeat("working", lease_id=lease_id).json()  # the worker hears it and stops
    client.portal.call(client.app.state.heartbeats.flush_now)  # type: ignore[attr-defined, union-attr]
    assert any(c["type"] in ("cancel", "lease_lost") for c in beat["commands"] +
               agent.heartbeat("working", lease_id=lease_id).json()["commands"])


def test_a_job_pauses_when_the_balance_runs_out_and_resumes_after_a_top_up(
    client: TestClient, session: Session, settings: CoordinatorSettings, provider, make_caller, upload,  # type: ignore[no-untyped-def]
) -> None:
    poor = make_caller("customer", "poor", credit="0.05")
    file_id = upload(poor).json()["id"]
    agent = FakeAgent.register(client, provider.key)
    job = client.post("/v1/fine_tuning/jobs", headers=poor.headers,
                      json={"model": "tunegrid/tiny-llama", "training_file": file_id}).json()
    a = agent.claim(wait_s=2)
    assert a is not None
    agent.progress(a["lease_id"], step=1)
    run_for(session, job["id"], a["lease_id"], 3600)  # $0.36 of work against $0.05 of credit
    assert budgets.enforce_budgets(session=session, settings=settings)["paused"] == 1
    body = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=poor.headers).json()
    assert body["status"] == "paused"
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=poor.headers).json()["data"]
    assert any(e["data"].get("code") == "insufficient_balance" for e in events)
    available = ledger.balance(session, Book.customer_available, poor.account_id)
    assert available < 0  # the work done was billed in full; the customer owes the difference
    assert ledger.balance(session, Book.customer_held, poor.account_id) == 0

    refused = client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume", headers=poor.headers)
    assert refused.status_code == 429
    account = session.get(AccountModel, poor.account_id)
    billing.grant(session=session, account=account, amount=usd_to_micros("5"), key="more", memo="top-up")
    session.commit()
    resumed = client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume", headers=poor.headers).json()
    assert resumed["status"] == "queued" and usd_to_micros(resumed["cost_held"]) > 0
    assert ledger.audit(session).ok

"""Per-second metering: each way a lease can end bills what the README's billing rule says, on the
coordinator's clock, and settles it in the ledger to the micro-dollar (customer pays price, provider earns
ask, the platform keeps the fee), once."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from coordinator.db.tables import (
    Book, JobCheckpointModel, JobModel, LeaseModel, LedgerTransactionModel, UsageRecordModel, utcnow,
)
from coordinator.services import billing, budgets, ledger
from coordinator.services.lease_states import reap
from coordinator.settings import CoordinatorSettings
from shared.money import usd_to_micros
from tests.fakes import FakeAgent, adapter_archive

ASK = usd_to_micros("0.30")  # the fake worker's ask per GPU-hour
PRICE = usd_to_micros("0.36")  # with the 20% platform fee
START_CREDIT = usd_to_micros("100")


@pytest.fixture
def provider(make_caller):  # type: ignore[no-untyped-def]
    return make_caller("provider", "pat")


@pytest.fixture
def running(client: TestClient, session: Session, provider, create_job):  # type: ignore[no-untyped-def]
    """A job whose lease started training `seconds` ago (on the coordinator's clock), heard from just now."""
    def start(seconds: int = 3600, *, checkpoint_after: int | None = None, **job_fields):  # type: ignore[no-untyped-def]
        agent = FakeAgent.register(client, provider.key)
        job = create_job(**job_fields).json()
        a = agent.claim(wait_s=2)
        assert a is not None
        assert agent.progress(a["lease_id"], step=1).status_code == 200
        if checkpoint_after is not None:
            assert agent.save_checkpoint(a["lease_id"], 5).status_code == 200
        backdate(session, a["lease_id"], job["id"], seconds, checkpoint_after=checkpoint_after)
        return agent, job, a["lease_id"]
    return start


def backdate(session: Session, lease_id: str, job_id: str, seconds: int, *, checkpoint_after: int | None = None) -> None:
    """The lease started training `seconds` ago on the coordinator's clock and was heard from just now."""
    now = utcnow()
    started = now - timedelta(seconds=seconds)
    session.execute(update(LeaseModel).where(LeaseModel.id == lease_id).values(
        training_started_at=started, last_renewed_at=now))
    session.execute(update(JobModel).where(JobModel.id == job_id).values(accruing_since=started))
    if checkpoint_after is not None:
        session.execute(update(JobCheckpointModel).where(JobCheckpointModel.lease_id == lease_id).values(
            created_at=started + timedelta(seconds=checkpoint_after)))
    session.commit()


def record(session: Session, lease_id: str) -> UsageRecordModel:
    session.expire_all()
    row = session.get(UsageRecordModel, lease_id)
    assert row is not None
    return row


def books(session: Session, customer_id: str, provider_id: str) -> tuple[int, int, int, int]:
    return (ledger.balance(session, Book.customer_available, customer_id),
            ledger.balance(session, Book.customer_held, customer_id),
            ledger.balance(session, Book.provider_payable, provider_id),
            ledger.balance(session, Book.platform_revenue))


def test_a_completed_lease_bills_its_training_time_to_the_micro_dollar(
    client: TestClient, session: Session, running, customer, provider,  # type: ignore[no-untyped-def]
) -> None:
    agent, job, lease_id = running(3600)
    adapter = adapter_archive()
    assert agent.upload(lease_id, "adapter", adapter).status_code == 200
    assert agent.complete(lease_id, adapter, usage={"wall_seconds": 3700.0, "gpu_seconds": 3650.0}).status_code == 200
    row = record(session, lease_id)
    assert row.rule == "until_end" and 3600 <= row.billable_seconds <= 3602
    s = row.billable_seconds
    assert row.charge_micros == -(-PRICE * s // 3600) and row.provider_micros == ASK * s // 3600
    assert row.fee_micros == row.charge_micros - row.provider_micros > 0
    available, held, payable, revenue = books(session, customer.account_id, provider.account_id)
    assert (available, held) == (START_CREDIT - row.charge_micros, 0)  # the rest of the hold came back
    assert (payable, revenue) == (row.provider_micros, row.fee_micros)
    body = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=customer.headers).json()
    assert body["status"] == "succeeded" and usd_to_micros(body["cost"]) == row.charge_micros
    assert body["cost_held"] == "0.000000"
    assert ledger.audit(session).ok


def test_a_worker_that_reports_less_time_is_billed_for_less(session: Session, running) -> None:  # type: ignore[no-untyped-def]
    agent, _, lease_id = running(3600)
    adapter = adapter_archive()
    agent.upload(lease_id, "adapter", adapter)
    agent.complete(lease_id, adapter, usage={"wall_seconds": 1800.0, "gpu_seconds": 1800.0})
    row = record(session, lease_id)
    assert row.billable_seconds == 1800 and row.charge_micros == PRICE // 2
    assert "reported 1800 s" in (row.note or "")


def test_a_worker_inflating_its_usage_is_billed_what_the_coordinator_saw(session: Session, running, provider) -> None:  # type: ignore[no-untyped-def]
    agent, _, lease_id = running(600)
    adapter = adapter_archive()
    agent.upload(lease_id, "adapter", adapter)
    agent.complete(lease_id, adapter, usage={"wall_seconds": 86_400.0, "gpu_seconds": 86_400.0})  # "a whole day"
    row = record(session, lease_id)
    assert 600 <= row.billable_seconds <= 602 and row.reported_seconds == 86_400.0
    assert ledger.balance(session, Book.provider_payable, provider.account_id) == ASK * row.billable_seconds // 3600


def test_a_worker_failure_bills_only_the_work_kept_in_its_last_checkpoint(
    session: Session, settings: CoordinatorSettings, running, customer, provider,  # type: ignore[no-untyped-def]
) -> None:
    agent, job, lease_id = running(3600, checkpoint_after=1200)
    assert agent.fail(lease_id, kind="worker_error").status_code == 200
    row = record(session, lease_id)
    assert (row.rule, row.billable_seconds) == ("until_checkpoint", 1200)
    assert row.charge_micros == PRICE // 3 and row.provider_micros == ASK // 3
    available, held, payable, _ = books(session, customer.account_id, provider.account_id)
    assert payable == ASK // 3 and available + held == START_CREDIT - PRICE // 3
    # The lease used up the job's (small) hold; queued again, it is not placed until it holds again.
    assert held == 0 and session.get(JobModel, job["id"]).held_micros == 0  # type: ignore[union-attr]
    assert budgets.enforce_budgets(session=session, settings=settings)["reheld"] == 1
    assert ledger.balance(session, Book.customer_held, customer.account_id) > 0


def test_without_a_checkpoint_a_failed_worker_bills_nothing(session: Session, running, customer) -> None:  # type: ignore[no-untyped-def]
    agent, _, lease_id = running(3600)
    agent.fail(lease_id, kind="worker_error")
    row = record(session, lease_id)
    assert (row.billable_seconds, row.charge_micros, row.provider_micros) == (0, 0, 0)
    assert session.scalars(select(LedgerTransactionModel).where(LedgerTransactionModel.kind == "settle")).all() == []


def test_preemption_costs_the_customer_nothing_past_the_checkpoint(session: Session, running) -> None:  # type: ignore[no-untyped-def]
    agent, _, lease_id = running(3600, checkpoint_after=3000)
    assert agent.preempted(lease_id).status_code == 200
    row = record(session, lease_id)
    assert (row.rule, row.billable_seconds) == ("until_checkpoint", 3000)


def test_a_claimed_user_error_is_neither_billed_nor_paid(session: Session, running, provider) -> None:  # type: ignore[no-untyped-def]
    agent, _, lease_id = running(600)
    agent.fail(lease_id, kind="user_error", message="bad data", usage={"wall_seconds": 700.0, "gpu_seconds": 600.0})
    row = record(session, lease_id)
    assert (row.rule, row.charge_micros, row.provider_micros) == ("not_billed", 0, 0)
    assert ledger.balance(session, Book.provider_payable, provider.account_id) == 0


def test_a_user_error_two_providers_report_bills_the_second_until_the_failure(  # type: ignore[no-untyped-def]
    client: TestClient, session: Session, running, make_caller,
) -> None:
    agent, job, first = running(600)
    agent.fail(first, kind="user_error", message="bad data")
    second = FakeAgent.register(client, make_caller("provider", "quinn").key, machine_id="pc-2")
    a = second.claim(wait_s=2)
    assert a is not None and a["job_id"] == job["id"]
    assert second.progress(a["lease_id"], step=1).status_code == 200
    backdate(session, a["lease_id"], job["id"], 600)
    second.fail(a["lease_id"], kind="user_error", message="bad data", usage={"wall_seconds": 700.0, "gpu_seconds": 600.0})
    assert record(session, first).charge_micros == 0
    row = record(session, a["lease_id"])
    assert row.rule == "until_end" and 600 <= row.billable_seconds <= 602


def test_a_rejected_adapter_is_not_billed_nor_paid(session: Session, running, provider) -> None:  # type: ignore[no-untyped-def]
    agent, _, lease_id = running(3600)
    bogus = adapter_archive(r=8)  # the job asked for r=16
    agent.upload(lease_id, "adapter", bogus)
    agent.complete(lease_id, bogus)
    row = record(session, lease_id)
    assert (row.rule, row.charge_micros, row.provider_micros) == ("not_billed", 0, 0)
    assert ledger.balance(session, Book.provider_payable, provider.account_id) == 0


def test_cancel_bills_up_to_the_cancel(client: TestClient, session: Session, running, customer) -> None:  # type: ignore[no-untyped-def]
    _, job, lease_id = running(900)
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=customer.headers).status_code == 200
    row = record(session, lease_id)
    assert row.rule == "until_end" and 900 <= row.billable_seconds <= 902
    assert ledger.balance(session, Book.customer_held, customer.account_id) == 0


def test_time_after_the_worker_went_silent_is_not_billed(
    session: Session, settings: CoordinatorSettings, running,  # type: ignore[no-untyped-def]
) -> None:
    _, _, lease_id = running(3600, checkpoint_after=3500)
    # Heard from 1000 s after training started, then silence: lost after the grace; the checkpoint at 3500 s
    # came after the last word, so billing stops at the last word plus the slack.
    lease = session.get(LeaseModel, lease_id)
    assert lease is not None and lease.training_started_at is not None
    lease.last_renewed_at = lease.training_started_at + timedelta(seconds=1000)
    session.commit()
    assert reap(session=session, settings=settings)["lost"] == 1
    row = record(session, lease_id)
    assert row.billable_seconds == 1030


def test_max_cost_caps_the_charge(session: Session, running, customer) -> None:  # type: ignore[no-untyped-def]
    agent, job, lease_id = running(3600, max_cost="0.10")
    adapter = adapter_archive()
    agent.upload(lease_id, "adapter", adapter)
    agent.complete(lease_id, adapter, usage={"wall_seconds": 3700.0, "gpu_seconds": 3650.0})
    row = record(session, lease_id)
    assert row.charge_micros <= usd_to_micros("0.10") and row.billable_seconds == 1000  # 0.10 / 0.36 h
    assert "max_cost" in (row.note or "")
    assert session.get(JobModel, job["id"]).billed_micros == row.charge_micros  # type: ignore[union-attr]


def test_a_lease_settles_once(session: Session, running) -> None:  # type: ignore[no-untyped-def]
    agent, job, lease_id = running(3600, checkpoint_after=1800)
    agent.fail(lease_id, message="CUDA error")
    row = record(session, lease_id)
    job_row = session.get(JobModel, job["id"])
    assert job_row is not None
    billed = job_row.billed_micros
    billing.settle(session=session, job=job_row, record=row)  # a second settlement of the same lease
    session.commit()
    assert job_row.billed_micros == billed
    assert len(session.scalars(select(LedgerTransactionModel).where(
        LedgerTransactionModel.business_key == f"settle:{lease_id}")).all()) == 1
    assert ledger.audit(session).ok

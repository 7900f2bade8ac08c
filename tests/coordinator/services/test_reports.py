"""`services/reports.py` (the dashboard's reads) on a real database, after a real lease ran through the services:
costs per day, customer, job and GPU class (one customer's own, or everyone's); the fleet filtered, searched and
sorted, with what each worker earned; jobs filtered; one job in full. Unknown filters are 400s."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, JobModel
from coordinator.services import reports
from shared.errors import InvalidRequest, NotFound
from tests.coordinator.services.test_budgets import run_for
from tests.fakes import ServiceAgent


@pytest.fixture
def ran(session: Session, service_agent, new_job, customer_account: AccountModel) -> tuple[JobModel, ServiceAgent]:  # type: ignore[no-untyped-def]
    """One job trained to the end on one worker, and another placed on a second one."""
    agent: ServiceAgent = service_agent("pc-busy", name="Busy PC")
    job = new_job(suffix="done")
    a = agent.claim()
    assert a is not None
    agent.progress(a.lease_id, step=2, loss=1.25)
    run_for(session, job.id, a.lease_id, 600)  # ten minutes of training, billed
    agent.finish(a.lease_id)
    new_job(suffix="waiting")
    service_agent("pc-idle", name="Idle PC").claim()
    return job, agent


def test_costs_add_up_per_day_customer_job_and_gpu_class(session: Session, ran, customer_account: AccountModel) -> None:  # type: ignore[no-untyped-def]
    job, _ = ran
    today = date.today()
    report = reports.costs(session=session, start=today - timedelta(days=2), end=today)
    assert [d["day"] for d in report.days] == [(today - timedelta(days=n)).isoformat() for n in (2, 1, 0)]
    assert report.spend == sum(d["spend"] for d in report.days) == sum(c["spend"] for c in report.customers) > 0
    assert report.revenue + report.earned == report.spend
    assert [j["job_id"] for j in report.jobs] == [job.id] and report.customers[0]["account_id"] == customer_account.id
    assert report.gpu_classes[0]["leases"] == 1 and report.payable == report.earned
    own = reports.costs(session=session, start=today, end=today, account_id=customer_account.id)
    assert own.spend == report.spend and own.paid_out == 0
    nobody = reports.costs(session=session, start=today, end=today, account_id="acct-nobody")
    assert nobody.spend == 0 and nobody.customers == []


def test_the_fleet_is_filtered_searched_sorted_and_shows_earnings(session: Session, ran) -> None:  # type: ignore[no-untyped-def]
    _, busy = ran
    everyone = reports.fleet(session=session, state=None, q=None, sort="name", descending=False, page=1)
    assert [w.name for w in everyone.rows] == ["Busy PC", "Idle PC"] and everyone.total == 2
    assert everyone.extra["earnings"][busy.worker_id] > 0
    assert everyone.extra["states"] == {"idle": 1, "working": 1}  # the idle PC took the waiting job
    assert [w.name for w in reports.fleet(session=session, state=None, q="idle", sort="name", descending=False,
                                          page=1).rows] == ["Idle PC"]
    assert reports.fleet(session=session, state=None, q=None, sort="name", descending=True, page=1).rows[0].name == "Idle PC"
    assert reports.fleet(session=session, state=None, q=None, sort="name", descending=False, page=1,
                         provider_id="acct-nobody").total == 0
    with pytest.raises(InvalidRequest):
        reports.fleet(session=session, state="sleeping", q=None, sort="name", descending=False, page=1)
    with pytest.raises(InvalidRequest):
        reports.fleet(session=session, state=None, q=None, sort="password", descending=False, page=1)


def test_jobs_are_filtered_and_paged(session: Session, ran, customer_account: AccountModel) -> None:  # type: ignore[no-untyped-def]
    job, busy = ran
    every = reports.jobs(session=session, status=None, customer=None, model=None, worker=None, page=1)
    assert every.total == 2 and every.extra["customers"] == {customer_account.id: customer_account.name}
    done = reports.jobs(session=session, status="succeeded", customer=None, model=None, worker=busy.worker_id, page=9)
    assert [j.id for j in done.rows] == [job.id] and done.page == 1  # a page past the end is the last one
    with pytest.raises(InvalidRequest):
        reports.jobs(session=session, status="finished", customer=None, model=None, worker=None, page=1)


def test_one_job_in_full_and_only_for_its_customer(session: Session, ran, customer_account: AccountModel) -> None:  # type: ignore[no-untyped-def]
    job, busy = ran
    detail = reports.job_detail(session=session, job_id=job.id, account_id=customer_account.id)
    assert [worker.id for _, worker in detail.leases] == [busy.worker_id] and len(detail.usage) == 1
    assert (2.0, 1.25) in detail.losses["training loss"] and detail.refunded == 0
    assert detail.events and detail.customer.id == customer_account.id
    with pytest.raises(NotFound):
        reports.job_detail(session=session, job_id=job.id, account_id="acct-someone-else")

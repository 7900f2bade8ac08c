"""`services/billing.py` on a real database: grants once per key, the balance and the transactions a customer
reads (what each did to their own books), a job's cost while it runs, and an admin's refund of a job (at most
what it was charged, once per form). Holds and settlement are test_budgets.py and test_metering.py."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, Role, utcnow
from coordinator.services import billing
from coordinator.services.keys import create_account
from shared.errors import InvalidRequest, NotFound
from shared.money import usd_to_micros
from tests.conftest import STARTING_CREDIT_USD


def test_a_grant_credits_once_per_key_and_only_positive_amounts(session: Session, customer_account: AccountModel) -> None:
    before = billing.balance_of(session=session, account=customer_account).available
    assert billing.grant(session=session, account=customer_account, amount=usd_to_micros("5"), key="g1", memo="welcome")
    session.commit()
    assert billing.grant(session=session, account=customer_account, amount=usd_to_micros("5"), key="g1", memo="again") is None
    session.commit()
    assert billing.balance_of(session=session, account=customer_account).available == before + usd_to_micros("5")
    with pytest.raises(InvalidRequest):
        billing.grant(session=session, account=customer_account, amount=0, key="g2", memo="nothing")


def test_transactions_show_what_each_did_to_the_customers_own_books(session: Session, customer_account: AccountModel,
                                                                    new_job) -> None:  # type: ignore[no-untyped-def]
    job = new_job()
    rows, has_more = billing.transactions(session=session, account=customer_account, after=None, limit=10)
    assert not has_more and [t.row.kind for t in rows] == ["hold", "grant"]  # newest first
    hold, grant = rows
    assert grant.available == usd_to_micros(STARTING_CREDIT_USD) and grant.held == 0
    assert hold.available == -job.held_micros and hold.held == job.held_micros and hold.row.job_id == job.id
    balance = billing.balance_of(session=session, account=customer_account)
    assert (balance.available, balance.held) == (usd_to_micros(STARTING_CREDIT_USD) - job.held_micros, job.held_micros)


def test_a_running_jobs_cost_counts_the_time_so_far_within_its_max_cost(new_job) -> None:  # type: ignore[no-untyped-def]
    job = new_job(max_cost="0.01")
    start = utcnow()
    job.accruing_since, job.accruing_price = start, usd_to_micros("3.60")  # a micro-dollar per second
    assert billing.job_cost(job, now=start + timedelta(seconds=10)).so_far == 10_000
    assert billing.job_cost(job, now=start + timedelta(hours=1)).so_far == usd_to_micros("0.01")  # capped


def test_an_admins_refund_is_at_most_what_the_job_was_charged_and_once_per_form(
    session: Session, customer_account: AccountModel, new_job,  # type: ignore[no-untyped-def]
) -> None:
    admin = create_account(session=session, name="root", role=Role.admin)
    job = new_job()
    job.billed_micros = usd_to_micros("2")
    session.commit()
    before = billing.balance_of(session=session, account=customer_account).available
    assert billing.refund_job(session=session, job_id=job.id, amount=usd_to_micros("1.5"), nonce="form-1",
                              admin=admin, reason="slow worker")
    assert billing.refund_job(session=session, job_id=job.id, amount=usd_to_micros("0.25"), nonce="form-1",
                              admin=admin, reason="double click") is None  # the same form, posted twice
    with pytest.raises(InvalidRequest):  # only 0.50 is left to refund
        billing.refund_job(session=session, job_id=job.id, amount=usd_to_micros("0.51"), nonce="form-2", admin=admin,
                           reason="more")
    session.rollback()
    assert billing.job_refunded(session, job.id) == usd_to_micros("1.5")
    assert billing.balance_of(session=session, account=customer_account).available == before + usd_to_micros("1.5")
    with pytest.raises(NotFound):
        billing.refund_job(session=session, job_id="ftjob-nope", amount=1, nonce="n", admin=admin, reason="x")

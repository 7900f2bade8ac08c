"""`services/market.py`: a job that names no price cap gets the market's (3x the median over providers of what
fitting GPUs cost, never above the ceiling), shown on the job and in its quote; a customer's own cap stands."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, JobModel
from coordinator.services import quotes
from coordinator.settings import CoordinatorSettings
from shared.money import usd_to_micros
from shared.schemas.quotes import QuoteCreate
from tests.fakes import ServiceAgent, gpu

Agents = Callable[..., ServiceAgent]


def test_without_a_fitting_machine_the_cap_is_the_ceiling(new_job: Callable[..., JobModel],
                                                           settings: CoordinatorSettings) -> None:
    job = new_job()
    assert (job.max_price_per_gpu_hour, job.max_price_source) == (settings.max_price_cap, "market")


def test_the_cap_is_three_times_the_median_over_providers(
    session: Session, service_agent: Agents, new_provider, new_job: Callable[..., JobModel],  # type: ignore[no-untyped-def]
) -> None:
    service_agent("a", price="0.10", provider=new_provider("ann"))
    service_agent("b", price="0.20", provider=new_provider("ben"))
    gouger = new_provider("greedy")
    for i in range(5):  # many machines of one provider count once
        service_agent(f"g{i}", price="1000", provider=gouger)
    job = new_job()
    # Provider medians (with the 20% fee): 0.12, 0.24, 1200 -> median 0.24 -> cap 0.72.
    assert (job.max_price_per_gpu_hour, job.max_price_source) == (usd_to_micros("0.72"), "market")


def test_the_cap_never_exceeds_the_ceiling(session: Session, service_agent: Agents, new_job: Callable[..., JobModel],
                                           settings: CoordinatorSettings) -> None:
    service_agent("only", price="1000")
    assert new_job().max_price_per_gpu_hour == settings.max_price_cap


def test_machines_that_cannot_run_the_job_do_not_set_its_price(
    session: Session, service_agent: Agents, new_provider, new_job: Callable[..., JobModel],  # type: ignore[no-untyped-def]
    settings: CoordinatorSettings,
) -> None:
    service_agent("old", price="0.01", gpus=[gpu("NVIDIA GeForce GTX 1080", 8, "6.1", uuid="GPU-old")],
                  provider=new_provider("ann"))  # no 4-bit kernels: cannot run it
    assert new_job().max_price_per_gpu_hour == settings.max_price_cap


def test_a_customers_own_cap_stands(new_job: Callable[..., JobModel], service_agent: Agents) -> None:
    service_agent("a", price="0.10")
    job = new_job(max_price_per_gpu_hour="50")
    assert (job.max_price_per_gpu_hour, job.max_price_source) == (usd_to_micros("50"), "customer")


def test_the_quote_shows_the_cap_the_job_would_get(session: Session, service_agent: Agents, new_provider,  # type: ignore[no-untyped-def]
                                                   customer_account: AccountModel, settings: CoordinatorSettings) -> None:
    cheap = service_agent("a", price="0.10")
    cheap.claim()
    service_agent("b", price="0.10", provider=new_provider("ben"))
    service_agent("dear", price="5.00", provider=new_provider("dee")).claim()  # above 3x the market: not offered
    q = quotes.quote(session=session, account=customer_account, settings=settings,
                     request=QuoteCreate.model_validate({"model": "tunegrid/tiny-llama", "training_tokens": 1000}))
    assert (q.max_price_per_gpu_hour, q.max_price_source) == ("0.360000", "market")
    assert q.workers_available == 1 and q.cheapest is not None and q.cheapest.worker_id == cheap.worker_id

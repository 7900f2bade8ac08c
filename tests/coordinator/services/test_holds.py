"""`services/holds.py` on a real database: a queued job holds its estimated cost with a margin, the estimate
taken from the dearest worker that could run it now (else the slowest GPU class that fits, at the job's max
price or the default), never less than the minimum hold nor more than what is left of its `max_cost`."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from coordinator.db.tables import JobModel
from coordinator.services import holds
from coordinator.settings import CoordinatorSettings
from shared.errors import Conflict
from shared.money import usd_to_micros
from shared.pricing import BPS


def margin(settings: CoordinatorSettings, estimate: int) -> int:
    return max(-(-estimate * settings.hold_margin_bps // BPS), settings.min_hold)


def test_a_job_holds_its_estimate_with_the_margin(new_job, session: Session, settings: CoordinatorSettings) -> None:  # type: ignore[no-untyped-def]
    job: JobModel = new_job(max_price_per_gpu_hour="5")
    assert job.held_micros == margin(settings, holds.estimated_cost(session, job, settings))


def test_the_dearest_idle_worker_sets_the_estimate(new_job, session: Session, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
                                                   service_agent) -> None:
    job: JobModel = new_job()
    without = holds.estimated_cost(session, job, settings)
    service_agent("cheap", price="0.01").claim()
    service_agent("dear", price="4.00").claim()
    with_workers = holds.estimated_cost(session, job, settings)
    service_agent("dearer", price="8.00").claim()
    assert holds.estimated_cost(session, job, settings) > with_workers != without


def test_a_hold_never_exceeds_what_is_left_of_max_cost(new_job, session: Session, settings: CoordinatorSettings) -> None:  # type: ignore[no-untyped-def]
    job: JobModel = new_job(max_cost="0.000010", max_price_per_gpu_hour="5")
    assert job.held_micros == 10
    job.billed_micros = 10
    with pytest.raises(Conflict) as spent:
        holds.hold_for_queue(session=session, job=job, settings=settings)
    assert spent.value.code == "max_cost_reached"


def test_the_smallest_hold_is_the_minimum(new_job, settings: CoordinatorSettings) -> None:  # type: ignore[no-untyped-def]
    job: JobModel = new_job(max_price_per_gpu_hour="0.000001")
    assert job.held_micros == settings.min_hold == usd_to_micros("0.01")

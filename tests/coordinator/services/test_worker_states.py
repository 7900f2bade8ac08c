"""`worker_states`, the one owner of a worker's state, reliability and suspension: each transition, the
reliability formula, suspension for failed checks, and the periodic rescore of the fleet."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from coordinator.db.tables import LeaseModel, LeaseStatus, WorkerModel, WorkerState, utcnow
from coordinator.effects import effects
from coordinator.services import worker_states
from coordinator.settings import CoordinatorSettings
from tests.fakes import ServiceAgent


def test_reliability_starts_at_nine_tenths_and_failed_checks_weigh_three_times() -> None:
    assert worker_states.reliability(completed=0, lost=0, failed_checks=0) == pytest.approx(0.9)
    assert worker_states.reliability(completed=10, lost=0, failed_checks=0) == pytest.approx(19 / 20)
    lost = worker_states.reliability(completed=0, lost=3, failed_checks=0)
    cheated = worker_states.reliability(completed=0, lost=0, failed_checks=1)
    assert lost == pytest.approx(cheated) == pytest.approx(9 / 13)


def ended(status: LeaseStatus, *, claim: str | None = None, job_id: str = "ftjob-x") -> LeaseModel:
    """A lease as `lease_states.end_lease` hands it over: its end status set (never added to the session)."""
    return LeaseModel(id="lease-x", job_id=job_id, status=status, claim=claim)


@pytest.mark.parametrize(("status", "failed_check", "against", "counter", "state"), [
    (LeaseStatus.completed, False, False, "completed_leases", WorkerState.idle),
    (LeaseStatus.failed, True, False, "failed_checks", WorkerState.idle),
    (LeaseStatus.failed, False, True, "lost_leases", WorkerState.idle),
    (LeaseStatus.lost, False, True, "lost_leases", WorkerState.offline),
    (LeaseStatus.cancelled, False, False, None, WorkerState.idle),
])
def test_a_leases_end_counts_rescores_frees_and_tells_the_agent(
    session: Session, service_agent, status: LeaseStatus, failed_check: bool, against: bool, counter: str | None,  # type: ignore[no-untyped-def]
    state: WorkerState,
) -> None:
    worker: WorkerModel = service_agent().worker
    worker_states.lease_started(session, worker)
    assert worker.state is WorkerState.working and worker.id in effects(session).wake
    worker_states.lease_ended(session, worker, lease=ended(status), failed_check=failed_check,
                              counts_against_worker=against)
    counts = {name: getattr(worker, name) for name in ("completed_leases", "failed_checks", "lost_leases")}
    assert counts == {name: int(name == counter) for name in counts}
    assert worker.reliability == pytest.approx(worker_states.reliability(
        completed=worker.completed_leases, lost=worker.lost_leases, failed_checks=worker.failed_checks))
    assert worker.state is state and worker.id in effects(session).recheck


def test_a_suspended_worker_stays_suspended_when_its_lease_ends(session: Session, service_agent) -> None:  # type: ignore[no-untyped-def]
    worker = service_agent().worker
    worker_states.suspend(session, worker, reason="stolen GPU")
    worker_states.lease_ended(session, worker, lease=ended(LeaseStatus.lost), failed_check=False,
                              counts_against_worker=False)
    assert worker.state is WorkerState.suspended and worker.pause_reason == "suspended by an admin: stolen GPU"


def test_failed_checks_suspend_at_the_limit_once(session: Session, service_agent) -> None:  # type: ignore[no-untyped-def]
    worker = service_agent().worker
    assert not worker_states.count_failed_check(session=session, worker=worker, max_failed_checks=2)
    assert worker.state is not WorkerState.suspended
    assert worker_states.count_failed_check(session=session, worker=worker, max_failed_checks=2)
    suspended_at = worker.suspended_at
    assert worker.state is WorkerState.suspended and suspended_at is not None and worker.available_until is None
    assert not worker_states.count_failed_check(session=session, worker=worker, max_failed_checks=2)  # said once
    assert worker.suspended_at == suspended_at and worker.failed_checks == 3


def test_re_registering_keeps_a_suspended_or_working_worker_as_it_is(session: Session, service_agent) -> None:  # type: ignore[no-untyped-def]
    worker = service_agent().worker
    for state, after in [(WorkerState.idle, WorkerState.offline), (WorkerState.paused, WorkerState.offline),
                         (WorkerState.working, WorkerState.working), (WorkerState.suspended, WorkerState.suspended)]:
        worker.state = state
        worker_states.registered(worker)
        assert worker.state is after


def test_asking_for_work_makes_a_worker_placeable_until_its_wait_ends(service_agent) -> None:  # type: ignore[no-untyped-def]
    worker = service_agent().worker
    worker.state, worker.pause_reason = WorkerState.paused, "a game"
    now = utcnow()
    worker_states.asking_for_work(worker, now=now, wait_s=20)
    assert worker.state is WorkerState.idle and worker.pause_reason is None
    assert worker.available_until == now + timedelta(seconds=20) + worker_states.AVAILABLE_SLACK


@pytest.mark.parametrize(("before", "activity", "after"), [
    (WorkerState.idle, "paused_by_owner", WorkerState.paused),
    (WorkerState.idle, "unavailable", WorkerState.offline),
    (WorkerState.paused, "idle", WorkerState.idle),
    (WorkerState.offline, "idle", WorkerState.idle),
    (WorkerState.working, "paused_by_owner", WorkerState.working),  # only a lease's end frees a worker
    (WorkerState.suspended, "idle", WorkerState.suspended),
])
def test_a_heartbeat_moves_the_state_as_the_owners_policy_says(session: Session, service_agent, before: WorkerState,  # type: ignore[no-untyped-def]
                                                               activity: str, after: WorkerState) -> None:
    agent: ServiceAgent = service_agent()
    session.execute(update(WorkerModel).where(WorkerModel.id == agent.worker_id).values(state=before))
    worker_states.heard(session.connection(), [{"b_id": agent.worker_id, "b_seen": utcnow(), "b_telemetry": {},
                                                "b_activity": activity, "b_reason": None}])
    session.commit()
    assert agent.worker.state is after


def test_rescoring_the_fleet_fixes_scores_suspends_and_marks_the_silent_offline(
    session: Session, service_agent, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
) -> None:
    drifted, cheat, silent = (service_agent(f"pc-{n}").worker for n in range(3))
    drifted.completed_leases, drifted.reliability = 5, 0.1
    cheat.failed_checks = settings.suspend_after_failed_checks
    silent.state, silent.last_heartbeat_at = WorkerState.idle, utcnow() - timedelta(seconds=settings.lease_ttl_s + 5)
    session.commit()
    assert worker_states.rescore_fleet(session=session, settings=settings) >= 3
    session.expire_all()
    assert session.get(WorkerModel, drifted.id).reliability == pytest.approx(14 / 15)  # type: ignore[union-attr]
    assert session.get(WorkerModel, cheat.id).state is WorkerState.suspended  # type: ignore[union-attr]
    assert session.get(WorkerModel, silent.id).state is WorkerState.offline  # type: ignore[union-attr]

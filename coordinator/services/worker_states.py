"""The one place a worker's state, reliability and suspension change: one function per transition, as
`job_states.change_status` is for jobs and `lease_states` for leases.

States: `offline` until it asks for work or heartbeats, `idle` while it long-polls, `working` while it holds a
lease, `paused` when its owner's policy stepped aside, `suspended` (by an admin or for failed checks: never
placed). Reliability is computed from the counters here and nowhere else.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, String, Text, bindparam, case, exists, literal, or_, select, update
from sqlalchemy.orm import Session

from coordinator.db.tables import LIVE_LEASE, LeaseModel, LeaseStatus, WorkerModel, WorkerState, utcnow
from coordinator.effects import effects
from coordinator.settings import CoordinatorSettings

# A new worker starts at PRIOR_GOOD / PRIOR_TOTAL (0.9) and earns or loses from there.
PRIOR_GOOD, PRIOR_TOTAL = 9, 10
FAILED_CHECK_WEIGHT = 3  # a tampered or empty adapter costs more trust than a crash
AVAILABLE_SLACK = timedelta(seconds=5)  # a long-polling worker stays placeable this long past its wait
RESCORE_BATCH = 100_000


def reliability(*, completed: int, lost: int, failed_checks: int) -> float:
    return (completed + PRIOR_GOOD) / (completed + lost + FAILED_CHECK_WEIGHT * failed_checks + PRIOR_TOTAL)


def _rescore(worker: WorkerModel) -> None:
    worker.reliability = reliability(completed=worker.completed_leases, lost=worker.lost_leases,
                                     failed_checks=worker.failed_checks)


# --- the agent's own doings -----------------------------------------------------------------------

def registered(worker: WorkerModel) -> None:
    """A new or re-registered machine is offline until it claims or heartbeats (a suspended one stays
    suspended; one holding a lease keeps working)."""
    if worker.state not in (WorkerState.suspended, WorkerState.working):
        worker.state = WorkerState.offline


def asking_for_work(worker: WorkerModel, *, now: datetime, wait_s: float) -> None:
    """A claim: the worker holds no live lease (the caller looked) and is placeable until its wait ends."""
    worker.state, worker.pause_reason = WorkerState.idle, None
    worker.available_until = now + timedelta(seconds=wait_s) + AVAILABLE_SLACK


def _state_after_heartbeat(activity: Any) -> Any:
    """The worker's state once a heartbeat says what it is doing (a SQL CASE, so a batch is one statement).

    Suspended stays suspended and working stays working (only a lease's end frees a worker, and only a claim
    makes it idle and placeable); otherwise the owner's policy speaks: paused, unavailable, or back. (A
    worker whose live lease the heartbeat renewed is set working apart, in `back_at_work`.)
    """
    state = WorkerModel.state
    as_state = lambda s: literal(s, WorkerModel.state.type)  # noqa: E731
    return case(
        # No IN (...) here: expanding parameters cannot be used in an executemany.
        (or_(state == WorkerState.suspended, state == WorkerState.working), state),
        (activity == "paused_by_owner", as_state(WorkerState.paused)),
        (activity == "unavailable", as_state(WorkerState.offline)),
        (or_(state == WorkerState.paused, state == WorkerState.offline), as_state(WorkerState.idle)),
        else_=state,
    )


_HEARD = (
    update(WorkerModel).where(WorkerModel.id == bindparam("b_id"))
    .values(last_heartbeat_at=bindparam("b_seen"), telemetry=bindparam("b_telemetry", type_=WorkerModel.telemetry.type),
            state=_state_after_heartbeat(bindparam("b_activity", type_=String)),
            pause_reason=bindparam("b_reason", type_=Text))
)


def heard(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Heartbeats, in worker id order: `b_id`, `b_seen`, `b_telemetry`, `b_activity`, `b_reason` per row."""
    conn.execute(_HEARD, rows)


def back_at_work(conn: Connection, worker_ids: list[str]) -> None:
    """Workers whose heartbeat renewed a live lease: one marked offline during a blip is working again."""
    if worker_ids:
        conn.execute(update(WorkerModel).where(WorkerModel.id.in_(worker_ids), WorkerModel.state == WorkerState.offline)
                     .values(state=WorkerState.working))


def paused_by_owner(worker: WorkerModel, *, reason: str) -> None:
    """The owner needed the PC back in the middle of a lease (its end is recorded by `lease_states`)."""
    worker.state, worker.pause_reason = WorkerState.paused, reason


# --- leases ---------------------------------------------------------------------------------------

def lease_started(session: Session, worker: WorkerModel) -> None:
    worker.state = WorkerState.working
    worker.available_until = None
    effects(session).wake.add(worker.id)


def lease_went_quiet(worker: WorkerModel) -> None:
    """Its lease is suspect: the worker is offline until it is heard from again."""
    if worker.state is WorkerState.working:
        worker.state = WorkerState.offline


def lease_ended(
    session: Session, worker: WorkerModel, *, status: LeaseStatus, failed_check: bool, counts_against_worker: bool,
) -> None:
    """Count how the lease ended, rescore, free the worker, and note that its agent must hear about it."""
    if status is LeaseStatus.completed:
        worker.completed_leases += 1
    elif failed_check:
        worker.failed_checks += 1
    elif counts_against_worker:
        worker.lost_leases += 1
    _rescore(worker)
    if worker.state is WorkerState.working:
        worker.state = WorkerState.idle if status is not LeaseStatus.lost else WorkerState.offline
    effects(session).recheck.add(worker.id)


# --- trust ----------------------------------------------------------------------------------------

def count_failed_check(*, session: Session, worker: WorkerModel, max_failed_checks: int) -> bool:
    """The worker sent something that failed the coordinator's checks (outside a lease's end: a checkpoint, a
    false claim about one); True when this suspended it."""
    worker.failed_checks += 1
    _rescore(worker)
    return suspend_if_untrustworthy(session=session, worker=worker, max_failed_checks=max_failed_checks)


def suspend_if_untrustworthy(*, session: Session, worker: WorkerModel, max_failed_checks: int) -> bool:
    if worker.failed_checks >= max_failed_checks and worker.suspended_at is None:
        worker.suspended_at = utcnow()
        worker.state = WorkerState.suspended
        worker.available_until = None
        return True
    return False


def suspend(session: Session, worker: WorkerModel, *, reason: str) -> None:
    """An admin's suspension (the caller ended its leases first): never placed again until lifted."""
    worker.suspended_at, worker.state, worker.available_until = utcnow(), WorkerState.suspended, None
    worker.pause_reason = f"suspended by an admin: {reason}"
    effects(session).recheck.add(worker.id)


def revoke(session: Session, worker: WorkerModel) -> None:
    """Its provider revoked it (the caller ended its leases first): its token stops working."""
    worker.revoked_at = utcnow()
    worker.state = WorkerState.offline
    worker.available_until = None
    effects(session).recheck.add(worker.id)


def rescore_fleet(*, session: Session, settings: CoordinatorSettings) -> int:
    """Recompute reliability from the counters, suspend workers past the failed-check limit, and mark
    workers silent for longer than the lease ttl offline. Returns how many rows changed."""
    now = utcnow()
    changed = 0
    workers = session.scalars(
        select(WorkerModel).where(WorkerModel.revoked_at.is_(None)).order_by(WorkerModel.id)
        .limit(RESCORE_BATCH).with_for_update(skip_locked=True)
    ).all()
    for worker in workers:
        before = worker.reliability
        _rescore(worker)
        if abs(worker.reliability - before) > 1e-9:
            changed += 1
        if suspend_if_untrustworthy(session=session, worker=worker,
                                    max_failed_checks=settings.suspend_after_failed_checks):
            changed += 1
    session.flush()
    stale = now - timedelta(seconds=settings.lease_ttl_s)
    result = session.execute(
        update(WorkerModel)
        .where(WorkerModel.state.in_([WorkerState.idle, WorkerState.paused]),
               WorkerModel.last_heartbeat_at < stale,
               (WorkerModel.available_until.is_(None)) | (WorkerModel.available_until < now))
        .values(state=WorkerState.offline, available_until=None)
        .execution_options(synchronize_session=False)
    )
    # A worker left "working" without a live lease (its agent vanished as the lease ended) is offline until it claims.
    orphaned = session.execute(
        update(WorkerModel)
        .where(WorkerModel.state == WorkerState.working,
               ~exists().where(LeaseModel.worker_id == WorkerModel.id, LeaseModel.status.in_(LIVE_LEASE)))
        .values(state=WorkerState.offline, available_until=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return changed + (result.rowcount or 0) + (orphaned.rowcount or 0)  # type: ignore[attr-defined]

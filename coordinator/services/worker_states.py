"""The one place a worker's state, reliability and suspension change: one function per transition, as
`job_states.change_status` is for jobs and `lease_states` for leases.

States: `offline` until it asks for work or heartbeats, `idle` while it long-polls, `working` while it holds a
lease, `paused` when its owner's policy stepped aside, `suspended` (by an admin or for failed checks: never
placed). Reliability is computed from the counters here and nowhere else.

Reliability and suspension belong to the provider as well as the machine: a new machine starts from its
provider's record (the counters of its other machines, `inherited_*`), and a provider with a suspended machine
has every new machine suspended at registration (placement skips its other machines too).

The preemption rule: preemption is the owner's right, so a preemption costs a worker nothing, except
- a preemption of a job this worker preempted before: a strike, and that job is not placed on it again;
- a preemption by a worker that preempted most of its leases (more than half, once it has had
  `MOST_LEASES_AFTER`): a strike.
A strike counts like a lost lease: it lowers reliability, which ranks placement.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, String, Text, bindparam, case, exists, func, literal, or_, select, update
from sqlalchemy.orm import Session

from coordinator.db.tables import LIVE_LEASE, LeaseModel, LeaseStatus, WorkerModel, WorkerState, utcnow
from coordinator.effects import effects
from coordinator.settings import CoordinatorSettings

# A new worker starts at PRIOR_GOOD / PRIOR_TOTAL (0.9) and earns or loses from there.
PRIOR_GOOD, PRIOR_TOTAL = 9, 10
FAILED_CHECK_WEIGHT = 3  # a tampered or empty adapter costs more trust than a crash
AVAILABLE_SLACK = timedelta(seconds=5)  # a long-polling worker stays placeable this long past its wait
RESCORE_BATCH = 100_000
MOST_LEASES_AFTER = 4  # the "preempts most of its leases" rule applies once a worker has had this many


def reliability(*, completed: int, lost: int, failed_checks: int) -> float:
    return (completed + PRIOR_GOOD) / (completed + lost + FAILED_CHECK_WEIGHT * failed_checks + PRIOR_TOTAL)


def _own_lost(worker: WorkerModel) -> int:
    """What counts against the machine like a lost lease: losses, preemption strikes, unconfirmed claims."""
    return worker.lost_leases + worker.preemption_strikes + worker.unconfirmed_claims


def _rescore(worker: WorkerModel) -> None:
    worker.reliability = reliability(completed=worker.completed_leases + worker.inherited_completed,
                                     lost=_own_lost(worker) + worker.inherited_lost,
                                     failed_checks=worker.failed_checks + worker.inherited_failed_checks)


def provider_suspended(session: Session, account_id: str) -> str | None:
    """The id of a suspended machine of this provider, if it has one."""
    return session.scalar(select(WorkerModel.id).where(WorkerModel.account_id == account_id,
                                                       WorkerModel.suspended_at.is_not(None)).limit(1))


# --- the agent's own doings -----------------------------------------------------------------------

def new_machine(session: Session, worker: WorkerModel) -> None:
    """A provider's new machine (added to the session, not flushed): it starts from the provider's record, and
    is suspended at once when the provider has a suspended machine."""
    completed, lost, strikes, claims, failed = session.execute(
        select(func.coalesce(func.sum(WorkerModel.completed_leases), 0), func.coalesce(func.sum(WorkerModel.lost_leases), 0),
               func.coalesce(func.sum(WorkerModel.preemption_strikes), 0),
               func.coalesce(func.sum(WorkerModel.unconfirmed_claims), 0),
               func.coalesce(func.sum(WorkerModel.failed_checks), 0))
        .where(WorkerModel.account_id == worker.account_id, WorkerModel.id != worker.id)).one()
    worker.inherited_completed, worker.inherited_failed_checks = int(completed), int(failed)
    worker.inherited_lost = int(lost) + int(strikes) + int(claims)
    _rescore(worker)
    suspended = provider_suspended(session, worker.account_id)
    if suspended is not None:
        worker.suspended_at, worker.state, worker.available_until = utcnow(), WorkerState.suspended, None
        worker.pause_reason = f"suspended: its provider's machine {suspended} is suspended"


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
    session: Session, worker: WorkerModel, *, lease: LeaseModel, failed_check: bool, counts_against_worker: bool,
) -> str | None:
    """Count how the lease ended, rescore, free the worker, and note that its agent must hear about it. Returns
    why the preemption rule struck, when it did."""
    status, struck = lease.status, None
    if status is LeaseStatus.completed:
        worker.completed_leases += 1
    elif failed_check:
        worker.failed_checks += 1
    elif lease.claim is not None:
        worker.unconfirmed_claims += 1
    elif counts_against_worker:
        worker.lost_leases += 1
    elif status is LeaseStatus.preempted:
        struck = _preempted(session, worker, lease)
    _rescore(worker)
    if worker.state is WorkerState.working:
        worker.state = WorkerState.idle if status is not LeaseStatus.lost else WorkerState.offline
    effects(session).recheck.add(worker.id)
    return struck


def _preempted(session: Session, worker: WorkerModel, lease: LeaseModel) -> str | None:
    """The preemption rule (the module's docstring): why this preemption is a strike, or None."""
    worker.preempted_leases += 1
    of_this_job = session.scalar(select(func.count()).select_from(LeaseModel).where(
        LeaseModel.job_id == lease.job_id, LeaseModel.worker_id == worker.id,
        LeaseModel.status == LeaseStatus.preempted)) or 0
    leases = worker.completed_leases + worker.lost_leases + worker.failed_checks + worker.preempted_leases \
        + worker.unconfirmed_claims
    why = None
    if of_this_job > 1:
        why = f"preempted job {lease.job_id} {of_this_job} times"
    elif leases >= MOST_LEASES_AFTER and 2 * worker.preempted_leases > leases:
        why = f"preempted {worker.preempted_leases} of its {leases} leases"
    if why is not None:
        worker.preemption_strikes += 1
    return why


def work_refuted(*, session: Session, worker: WorkerModel, max_failed_checks: int, blame: bool = True) -> bool:
    """Independent verification refuted work this worker completed (its adapter, or a verifier's figures two
    others contradicted): the completion no longer counts, and (`blame`) it weighs like a failed check. True
    when this suspended it."""
    worker.completed_leases = max(worker.completed_leases - 1, 0)
    if not blame:
        _rescore(worker)
        return False
    return count_failed_check(session=session, worker=worker, max_failed_checks=max_failed_checks)


def claim_confirmed(worker: WorkerModel) -> None:
    """A second, independent worker confirmed what this one claimed about a job: it no longer counts against it."""
    worker.unconfirmed_claims = max(worker.unconfirmed_claims - 1, 0)
    _rescore(worker)


# --- trust ----------------------------------------------------------------------------------------

def count_failed_check(*, session: Session, worker: WorkerModel, max_failed_checks: int) -> bool:
    """The worker sent something that failed the coordinator's checks (outside a lease's end: a checkpoint, a
    false claim about one); True when this suspended it."""
    worker.failed_checks += 1
    _rescore(worker)
    return suspend_if_untrustworthy(session=session, worker=worker, max_failed_checks=max_failed_checks)


def suspend_if_untrustworthy(*, session: Session, worker: WorkerModel, max_failed_checks: int) -> bool:
    if worker.failed_checks + worker.inherited_failed_checks >= max_failed_checks and worker.suspended_at is None:
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

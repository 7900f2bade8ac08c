"""The one place a lease starts, is renewed or ends: on the worker's report (`leases.py` calls here) or on
the coordinator's own decision (the customer cancels or pauses, a budget runs out, a provider revokes, the
reaper finds it quiet).

A lease ends exactly once: `completed`, `failed`, `preempted`, `lost` or `cancelled`. Its end bills it once
(`metering`), tells the worker's owner (`worker_states`) and, where the job goes on, sends the job back to the
queue or fails it (`end_and_requeue`). Locks are always taken job, then lease, then worker.
"""

from __future__ import annotations

import logging

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Integer, bindparam, case, func, or_, select, update
from sqlalchemy.orm import Session

from coordinator.db.ids import new_id
from coordinator.db.tables import (
    LIVE_LEASE, JobCheckpointModel, JobKind, JobModel, JobStatus, LeaseKind, LeaseModel, LeaseStatus, WorkerModel, utcnow,
)
from coordinator.metrics import LEASES_ENDED, LEASES_STARTED, count_on_commit
from coordinator.services import batch_rows, held_out, replicas, results, worker_states
from coordinator.services.job_states import change_status, exclude, record_event
from coordinator.services.metering import meter_lease, rule_for, until_checkpoint_charge
from coordinator.settings import CoordinatorSettings
from coordinator.stores import open_store
from shared.errors import Conflict

REAP_BATCH = 500  # leases one reaper pass handles; the next pass takes the rest
WITHHELD_MODES = ("always", "redundant")  # a lease's checkpoint waits for the verdict (`replicas.py`)

log = logging.getLogger(__name__)


# --- start and renewal ----------------------------------------------------------------------------

def start_lease(
    *, session: Session, job: JobModel, worker: WorkerModel, price_per_gpu_hour: int, resume_checkpoint_id: str | None,
    now: datetime, kind: str = "train",
) -> LeaseModel:
    """A new lease with the job's next fencing token; the caller moves the job to running with that token
    (`job_states.change_status_many`, which writes `jobs.fencing_token`)."""
    gpu_uuid = max(worker.gpus, key=lambda g: g["memory_total_bytes"])["uuid"] if worker.gpus else None
    lease = LeaseModel(
        id=new_id("lease-"), job_id=job.id, worker_id=worker.id, fencing_token=job.fencing_token + 1, kind=kind,
        status=LeaseStatus.assigned, gpu_uuid=gpu_uuid, gpu_class=worker.gpu_class,
        ask_price_per_gpu_hour=worker.ask_price_per_gpu_hour, price_per_gpu_hour=price_per_gpu_hour,
        resume_checkpoint_id=resume_checkpoint_id, created_at=now, last_renewed_at=now,
    )
    session.add(lease)
    count_on_commit(session, LEASES_STARTED, kind=str(kind))
    worker_states.lease_started(session, worker)
    if kind == LeaseKind.verify:  # it may see the held-out sample and the adapter under test: it never trains the job
        state = job.verification or {}
        if worker.account_id not in state.get("never_trains", []):
            job.verification = {**state, "never_trains": [*state.get("never_trains", []), worker.account_id]}
        held_out.viewed(session, job, worker.account_id)  # nor any job that holds back the same sample
    return lease


def renew(*, lease: LeaseModel, now: datetime) -> None:
    """The worker was heard on this lease (it picked it up, or reported on it): no longer quiet."""
    if lease.status is LeaseStatus.assigned:
        lease.status = LeaseStatus.running
        lease.claimed_at = now
    lease.last_renewed_at = now
    lease.suspect_at = None


_RENEW_REPORTED = (
    update(LeaseModel)
    .where(LeaseModel.id == bindparam("b_lease"), LeaseModel.worker_id == bindparam("b_id"),
           or_(*(LeaseModel.status == status for status in LIVE_LEASE)))
    .values(last_renewed_at=bindparam("b_seen"), suspect_at=None,
            last_step=case((func.coalesce(LeaseModel.last_step, -1) < bindparam("b_step", type_=Integer),
                            bindparam("b_step", type_=Integer)), else_=LeaseModel.last_step))
)


def renew_reported(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Heartbeats naming their live lease, in lease id order (one statement for a batch): `b_lease`, `b_id`
    (the worker), `b_seen`, `b_step` per row. A lease that is not the worker's, or not live, is left alone."""
    if rows:
        conn.execute(_RENEW_REPORTED, rows)


# --- ending ---------------------------------------------------------------------------------------

def end_lease(
    *, session: Session, lease: LeaseModel, job: JobModel, worker: WorkerModel, status: LeaseStatus, reason: str,
    usage: dict[str, Any] | None = None, failed_check: bool = False, counts_against_worker: bool = False,
    unbilled: bool = False, claim: str | None = None, settle_later: bool = False,
) -> None:
    """End the lease (the caller holds job, lease and worker locks, in that order) and bill it once
    (`metering`: how the lease ended decides what is billed; `unbilled`: nothing, through no fault of the
    worker, as when the checkpoint it was handed proved bad; `claim`: what the worker claimed about the job and
    the coordinator has not confirmed, neither billed nor paid, and counted against the worker). A preemption
    the preemption rule strikes (`worker_states`) takes the job off this worker for good. `settle_later`: its
    work is under verification, metered when the verdict comes (`verification.py`); so is the checkpoint of a
    lease that ends early in a job whose customer asked for verification (withheld, `replicas.py`). The job is
    the caller's to move."""
    if lease.status not in LIVE_LEASE:
        raise Conflict(f"Lease {lease.id} has already ended ({lease.status.value}).", code="lease_ended")
    if status in LIVE_LEASE:
        raise ValueError(f"{status} is not an end state")
    lease.status = status
    count_on_commit(session, LEASES_ENDED, kind=str(lease.kind), status=status.value)
    lease.ended_at = utcnow()
    lease.end_reason = reason
    lease.claim = claim
    if usage is not None:
        lease.usage = usage
    rule = "not_billed" if unbilled or claim else rule_for(status, failed_check=failed_check,
                                                             counts_against_worker=counts_against_worker)
    if (not settle_later and rule == "until_checkpoint" and lease.kind == LeaseKind.train
            and job.verification_mode in WITHHELD_MODES):
        charge = until_checkpoint_charge(session, lease)
        if charge:  # its checkpoint is part of an adapter not yet checked: paid with it (`replicas.py`)
            replicas.withhold(job, lease_id=lease.id, provider_id=worker.account_id, charge=charge)
            settle_later = True
    if replicas.waiting_providers(job):  # the job may end in this transaction, settling them: lock before posting
        replicas.lock_books(session, job, worker.account_id)
    if settle_later:
        job.accruing_since = job.accruing_price = None
    else:
        meter_lease(session=session, lease=lease, job=job, worker=worker, ended_at=lease.ended_at, usage=usage,
                    rule=rule)
    struck = worker_states.lease_ended(session, worker, lease=lease, failed_check=failed_check,
                                       counts_against_worker=counts_against_worker)
    if struck is not None:
        exclude(job, worker=worker.id)
        record_event(session=session, job=job, level="warn", data={"lease_id": lease.id, "worker_id": worker.id},
                     message=f"Worker {worker.id} {struck}: the job is not placed on it again")


def _requeue_or_fail(
    *, session: Session, job: JobModel, reason: str, count_attempt: bool, settings: CoordinatorSettings,
) -> None:
    """Send a running job back to the queue (it resumes from its last checkpoint), or fail it when the
    worker losses reached `max_attempts` (a redundant job with a confirmed training delivers that instead)."""
    if count_attempt:
        job.attempts += 1
    if job.attempts >= settings.max_attempts:
        why = f"the next training failed on {job.attempts} workers in a row (last: {reason})"
        store = open_store(settings)
        if results.deliver_uncompared(session=session, store=store, job=job, why=why):
            return
        if job.kind == JobKind.batch:  # what was answered, and billed, is the customer's still
            batch_rows.finalize(session=session, store=store, batch=job)
        change_status(
            session=session, job=job, to=JobStatus.failed,
            message=f"{reason}; the job failed after {job.attempts} worker failures",
            error={"code": "worker_error", "message": f"The job failed on {job.attempts} workers in a row. "
                   f"Last: {reason}", "param": None},
        )
        return
    change_status(session=session, job=job, to=JobStatus.queued,
                  message=f"{reason}; queued again to resume from its last checkpoint", level="warn")


def end_and_requeue(
    *, session: Session, lease: LeaseModel, job: JobModel, worker: WorkerModel, status: LeaseStatus, reason: str,
    settings: CoordinatorSettings, count_attempt: bool, job_reason: str | None = None,
    usage: dict[str, Any] | None = None, failed_check: bool = False, counts_against_worker: bool = False,
    unbilled: bool = False, claim: str | None = None, settle_later: bool = False,
) -> None:
    """End the lease and send its job back to the queue, or fail it after `max_attempts` (`count_attempt`:
    this end uses one of the job's attempts). `job_reason` is what the job's event says, when not `reason`. A
    verification lease that ends without its figures uses no attempt of the customer's job, and its provider does
    not verify that adapter again."""
    if lease.kind == LeaseKind.verify and status is not LeaseStatus.completed:
        # A verifier that did not deliver: its provider does not verify this adapter again (a new machine id
        # would not help), and a failure or loss takes the machine off the job.
        count_attempt = False
        state = job.verification or {}
        if worker.account_id not in state.get("not_by", []):
            job.verification = {**state, "not_by": [*state.get("not_by", []), worker.account_id]}
        if status in (LeaseStatus.failed, LeaseStatus.lost):
            exclude(job, worker=worker.id)
    end_lease(session=session, lease=lease, job=job, worker=worker, status=status, reason=reason, usage=usage,
              failed_check=failed_check, counts_against_worker=counts_against_worker, unbilled=unbilled, claim=claim,
              settle_later=settle_later)
    _requeue_or_fail(session=session, job=job, reason=job_reason or reason, count_attempt=count_attempt,
                    settings=settings)


# --- the coordinator's own endings ----------------------------------------------------------------

def end_for_customer(*, session: Session, job: JobModel, paused: bool) -> None:
    """The customer cancelled or paused a running job (the caller holds the job's lock): its live lease
    ends and the worker hears it."""
    end_live_leases(session=session, job=job,
                    reason="the customer paused the job" if paused else "the customer cancelled the job")


def end_live_leases(*, session: Session, job: JobModel, reason: str) -> None:
    """The job stops (cancelled, paused, out of budget; the caller holds its lock and moves it): its live
    leases end as cancelled, billed up to now."""
    for lease in session.scalars(
        select(LeaseModel).where(LeaseModel.job_id == job.id, LeaseModel.status.in_(LIVE_LEASE))
        .with_for_update().execution_options(populate_existing=True)
    ):
        worker = session.get(WorkerModel, lease.worker_id, with_for_update=True, populate_existing=True)
        assert worker is not None
        end_lease(session=session, lease=lease, job=job, worker=worker, status=LeaseStatus.cancelled, reason=reason)


def live_providers(session: Session, job: JobModel) -> list[str]:
    """The providers whose workers hold the job's live leases."""
    return list(session.scalars(select(WorkerModel.account_id).join(LeaseModel, LeaseModel.worker_id == WorkerModel.id)
                                .where(LeaseModel.job_id == job.id, LeaseModel.status.in_(LIVE_LEASE))))


def lock_lease(
    session: Session, lease_id: str, statuses: tuple[LeaseStatus, ...], *, wait: bool = False,
) -> tuple[LeaseModel, JobModel, WorkerModel] | None:
    """Lock job, lease and worker in the one order every path uses; None when another process holds the job or
    the lease (unless `wait`: then it waits for them), or the lease has moved on meanwhile (the caller commits
    and moves on)."""
    peek = session.get(LeaseModel, lease_id)
    if peek is None:
        return None
    job = session.scalars(select(JobModel).where(JobModel.id == peek.job_id).with_for_update(skip_locked=not wait)
                          .execution_options(populate_existing=True)).first()
    if job is None:
        return None
    lease = session.scalars(select(LeaseModel).where(LeaseModel.id == lease_id, LeaseModel.status.in_(statuses))
                            .with_for_update(skip_locked=not wait).execution_options(populate_existing=True)).first()
    if lease is None:
        return None
    worker = session.get(WorkerModel, lease.worker_id, with_for_update=True, populate_existing=True)
    assert worker is not None
    return lease, job, worker


def release_revoked(*, session: Session, worker: WorkerModel, settings: CoordinatorSettings,
                    why: str = "revoked by its provider", untrusted: bool = False) -> int:
    """A revoked (or suspended) worker's live leases end at once; their jobs go back to the queue without using
    an attempt. Each lease's end is committed on its own (one transaction moves one job's money). `untrusted`
    (suspended for work that failed its checks): the leases are not paid, their checkpoints are never resumed
    from, and each waits for its job's lock rather than skip a job another process holds."""
    lease_ids = session.scalars(select(LeaseModel.id).where(
        LeaseModel.worker_id == worker.id, LeaseModel.status.in_(LIVE_LEASE))).all()
    for lease_id in lease_ids:
        locked = lock_lease(session, lease_id, LIVE_LEASE, wait=untrusted)
        if locked is not None:
            lease, job, row = locked
            if untrusted:
                session.execute(update(JobCheckpointModel).where(
                    JobCheckpointModel.lease_id == lease.id, JobCheckpointModel.quarantined_at.is_(None)).values(
                    quarantined_at=utcnow(), quarantine_reason=f"its worker was {why}"[:2000]))
            end_and_requeue(session=session, lease=lease, job=job, worker=row, status=LeaseStatus.lost,
                            reason=f"Worker {row.id} was {why}", settings=settings, count_attempt=False,
                            unbilled=untrusted)
        session.commit()
    return len(lease_ids)


def release_suspended(*, session: Session, settings: CoordinatorSettings, provider_ids: list[str], why: str) -> int:
    """Providers suspended for work that failed its checks (a suspension belongs to the provider): every live
    lease of every machine of theirs ends, untrusted (`release_revoked`). How many leases."""
    released = 0
    for worker in session.scalars(select(WorkerModel).where(WorkerModel.account_id.in_(sorted(set(provider_ids))))
                                  .order_by(WorkerModel.id)).all():
        released += release_revoked(session=session, worker=worker, settings=settings, why=why, untrusted=True)
    return released


def fail_check(*, session: Session, settings: CoordinatorSettings, lease: LeaseModel, job: JobModel,
               worker: WorkerModel, reason: str, usage: dict[str, Any] | None) -> None:
    """A lease's result failed the coordinator's checks (an adapter, an export): the lease fails unbilled and
    unpaid, uses an attempt, counts against its worker, and the job goes on elsewhere; a worker that check
    suspends loses every live lease of its provider. Commits."""
    end_and_requeue(session=session, lease=lease, job=job, worker=worker, status=LeaseStatus.failed, reason=reason,
                    job_reason=f"{reason} (worker {worker.id})", settings=settings, count_attempt=True, usage=usage,
                    failed_check=True)
    suspended = worker_states.suspend_if_untrustworthy(session=session, worker=worker,
                                                       max_failed_checks=settings.suspend_after_failed_checks)
    session.commit()
    if suspended:
        log.warning("worker %s suspended after %d failed checks", worker.id, worker.failed_checks)
        release_suspended(session=session, settings=settings, provider_ids=[worker.account_id],
                          why=f"suspended after {worker.failed_checks} failed checks")
        session.commit()


# --- the reaper -----------------------------------------------------------------------------------

def _leases_before(session: Session, status: LeaseStatus, column: Any, before: datetime) -> list[str]:
    return list(session.scalars(select(LeaseModel.id).where(LeaseModel.status == status, column < before)
                                .order_by(LeaseModel.id).limit(REAP_BATCH)))


def _reap_quiet(session: Session, settings: CoordinatorSettings, lease_id: str, now: datetime) -> str | None:
    """A running lease not renewed within the ttl: suspect first, lost after the grace (what it became)."""
    locked = lock_lease(session, lease_id, (LeaseStatus.running,))
    if locked is None:
        return None
    lease, job, worker = locked
    silent = (now - lease.last_renewed_at).total_seconds() if lease.last_renewed_at else 0
    if silent < settings.lease_ttl_s:
        return None  # renewed while we looked
    if silent >= settings.lease_grace_s:
        end_and_requeue(session=session, lease=lease, job=job, worker=worker, status=LeaseStatus.lost,
                        reason=f"Worker {worker.id} was not heard from for {int(silent)} s", settings=settings,
                        count_attempt=True, counts_against_worker=True)
        return "lost"
    if lease.suspect_at is not None:
        return None  # said once
    lease.suspect_at = now
    worker_states.lease_went_quiet(worker)
    record_event(session=session, job=job, level="warn",
                 message=f"Worker {worker.id} has not reported for {int(silent)} s; waiting up to "
                         f"{settings.lease_grace_s} s before resuming elsewhere",
                 data={"lease_id": lease.id})
    return "suspect"


def _reap_unclaimed(session: Session, settings: CoordinatorSettings, lease_id: str) -> str | None:
    locked = lock_lease(session, lease_id, (LeaseStatus.assigned,))
    if locked is None:
        return None
    lease, job, worker = locked
    end_and_requeue(session=session, lease=lease, job=job, worker=worker, status=LeaseStatus.lost,
                    reason=f"Worker {worker.id} did not pick up its assignment within {settings.assignment_ttl_s} s",
                    settings=settings, count_attempt=False)
    return "unclaimed"


def reap(*, session: Session, settings: CoordinatorSettings) -> dict[str, int]:
    """Leases gone quiet: suspect after `lease_ttl`, lost after `lease_grace` (the job resumes elsewhere);
    assignments never picked up go back to the queue. Idempotent; safe in any number of processes. Each lease
    is committed on its own: one transaction moves one job's money (`ledger`'s lock order)."""
    now = utcnow()
    counts = {"suspect": 0, "lost": 0, "unclaimed": 0}
    for lease_id in _leases_before(session, LeaseStatus.running, LeaseModel.last_renewed_at,
                                   now - timedelta(seconds=settings.lease_ttl_s)):
        became = _reap_quiet(session, settings, lease_id, now)
        session.commit()
        if became is not None:
            counts[became] += 1
    for lease_id in _leases_before(session, LeaseStatus.assigned, LeaseModel.created_at,
                                   now - timedelta(seconds=settings.assignment_ttl_s)):
        became = _reap_unclaimed(session, settings, lease_id)
        session.commit()
        if became is not None:
            counts[became] += 1
    counts["suspended"] = _reap_suspended(session, settings)
    session.commit()
    return counts


def _reap_suspended(session: Session, settings: CoordinatorSettings) -> int:
    """Live leases of a provider with a machine suspended for failed checks: its suspension's release
    (`release_suspended`) runs after the suspension commits, and one that failed (a deadlock answered 503, a
    crash) is done here."""
    suspended = select(WorkerModel.account_id).where(
        WorkerModel.suspended_at.is_not(None),
        WorkerModel.failed_checks + WorkerModel.inherited_failed_checks >= settings.suspend_after_failed_checks)
    providers = session.scalars(select(WorkerModel.account_id).join(
        LeaseModel, LeaseModel.worker_id == WorkerModel.id).where(
        LeaseModel.status.in_(LIVE_LEASE), WorkerModel.account_id.in_(suspended)).distinct().limit(REAP_BATCH)).all()
    session.commit()
    return release_suspended(session=session, settings=settings, provider_ids=list(providers),
                             why="suspended (its release is finished by the reaper)") if providers else 0

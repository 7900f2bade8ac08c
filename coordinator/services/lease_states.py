"""The one place a lease starts or ends, and with it the worker's state and reputation.

A lease ends exactly once: `completed`, `failed`, `preempted`, `lost` or `cancelled`. Its end
updates the worker's counters and reliability, frees the worker, and notes that the agent must hear
about it (`recheck`). What happens to the job is decided by the caller through `job_states`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from coordinator.db.ids import new_id
from coordinator.db.models import LIVE_LEASE, JobModel, JobStatus, LeaseModel, LeaseStatus, WorkerModel, WorkerState, utcnow
from coordinator.effects import effects
from coordinator.services.job_states import change_status
from coordinator.services.metering import meter_lease, rule_for
from shared.errors import Conflict

# A new worker starts at PRIOR_GOOD / PRIOR_TOTAL (0.9) and earns or loses from there.
PRIOR_GOOD, PRIOR_TOTAL = 9, 10
FAILED_CHECK_WEIGHT = 3  # a tampered or empty adapter costs more trust than a crash


def reliability(*, completed: int, lost: int, failed_checks: int) -> float:
    return (completed + PRIOR_GOOD) / (completed + lost + FAILED_CHECK_WEIGHT * failed_checks + PRIOR_TOTAL)


def start_lease(
    *, session: Session, job: JobModel, worker: WorkerModel, price_per_gpu_hour: int, resume_checkpoint_id: str | None,
    now: datetime,
) -> LeaseModel:
    """A new lease with the job's next fencing token; the caller moves the job to running with that token
    (`job_states.change_status_many`, which writes `jobs.fencing_token`)."""
    gpu_uuid = max(worker.gpus, key=lambda g: g["memory_total_bytes"])["uuid"] if worker.gpus else None
    lease = LeaseModel(
        id=new_id("lease-"), job_id=job.id, worker_id=worker.id, fencing_token=job.fencing_token + 1,
        status=LeaseStatus.assigned, gpu_uuid=gpu_uuid, gpu_class=worker.gpu_class,
        ask_price_per_gpu_hour=worker.ask_price_per_gpu_hour, price_per_gpu_hour=price_per_gpu_hour,
        resume_checkpoint_id=resume_checkpoint_id, created_at=now, last_renewed_at=now,
    )
    session.add(lease)
    worker.state = WorkerState.working
    worker.available_until = None
    effects(session).wake.add(worker.id)
    return lease


def claim_lease(*, lease: LeaseModel, now: datetime) -> None:
    if lease.status is LeaseStatus.assigned:
        lease.status = LeaseStatus.running
        lease.claimed_at = now
    lease.last_renewed_at = now
    lease.suspect_at = None


def end_lease(
    *, session: Session, lease: LeaseModel, job: JobModel, worker: WorkerModel, status: LeaseStatus, reason: str,
    usage: dict[str, Any] | None = None, failed_check: bool = False, counts_against_worker: bool = False,
    unbilled: bool = False,
) -> None:
    """End the lease (the caller holds job, lease and worker locks, in that order) and bill it once
    (`metering`: how the lease ended decides what is billed; `unbilled`: nothing, through no fault of the
    worker, as when the checkpoint it was handed proved bad)."""
    if lease.status not in LIVE_LEASE:
        raise Conflict(f"Lease {lease.id} has already ended ({lease.status.value}).", code="lease_ended")
    if status in LIVE_LEASE:
        raise ValueError(f"{status} is not an end state")
    lease.status = status
    lease.ended_at = utcnow()
    lease.end_reason = reason
    if usage is not None:
        lease.usage = usage
    meter_lease(session=session, lease=lease, job=job, worker=worker, ended_at=lease.ended_at, usage=usage,
                rule="not_billed" if unbilled else rule_for(status, failed_check=failed_check,
                                                            counts_against_worker=counts_against_worker))
    if status is LeaseStatus.completed:
        worker.completed_leases += 1
    elif failed_check:
        worker.failed_checks += 1
    elif counts_against_worker:
        worker.lost_leases += 1
    worker.reliability = reliability(completed=worker.completed_leases, lost=worker.lost_leases,
                                     failed_checks=worker.failed_checks)
    if worker.state is WorkerState.working:
        worker.state = WorkerState.idle if status is not LeaseStatus.lost else WorkerState.offline
    effects(session).recheck.add(worker.id)


def count_failed_check(*, session: Session, worker: WorkerModel, max_failed_checks: int) -> bool:
    """The worker sent something that failed the coordinator's checks (outside a lease's end: a checkpoint, a
    false claim about one); True when this suspended it."""
    worker.failed_checks += 1
    worker.reliability = reliability(completed=worker.completed_leases, lost=worker.lost_leases,
                                     failed_checks=worker.failed_checks)
    return suspend_if_untrustworthy(session=session, worker=worker, max_failed_checks=max_failed_checks)


def suspend_if_untrustworthy(*, session: Session, worker: WorkerModel, max_failed_checks: int) -> bool:
    if worker.failed_checks >= max_failed_checks and worker.suspended_at is None:
        worker.suspended_at = utcnow()
        worker.state = WorkerState.suspended
        worker.available_until = None
        return True
    return False


def requeue_or_fail(
    *, session: Session, job: JobModel, reason: str, count_attempt: bool, max_attempts: int,
) -> None:
    """Send a running job back to the queue (it resumes from its last checkpoint), or fail it when the
    worker losses reached `max_attempts`."""
    if count_attempt:
        job.attempts += 1
    if job.attempts >= max_attempts:
        change_status(
            session=session, job=job, to=JobStatus.failed,
            message=f"{reason}; the job failed after {job.attempts} worker failures",
            error={"code": "worker_error", "message": f"The job failed on {job.attempts} workers in a row. "
                   f"Last: {reason}", "param": None},
        )
        return
    change_status(session=session, job=job, to=JobStatus.queued,
                  message=f"{reason}; queued again to resume from its last checkpoint", level="warn")

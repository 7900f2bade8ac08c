"""A lease, fenced: every call on a lease names it and presents its fencing token. A token that is not the
lease's, or a lease that is no longer the job's live one, is `409 lease_lost`: the agent stops that container.
Finishing is idempotent on the token: the same report twice answers the same (`already_ended`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy.orm import Session

from coordinator.db.tables import LIVE_LEASE, JobModel, LeaseModel, LeaseStatus, WorkerModel
from shared.errors import Conflict, InvalidRequest, LeaseLost, NotFound

_TOKEN = re.compile(r"[0-9]{1,18}")


def parse_fencing_token(value: str | None) -> int:
    if value is None or _TOKEN.fullmatch(value.strip()) is None:
        raise InvalidRequest("Send the lease's fencing token in the Tunegrid-Fencing-Token header.",
                             param="Tunegrid-Fencing-Token", code="missing_fencing_token")
    return int(value)


@dataclass(slots=True)
class FencedLease:
    lease: LeaseModel
    job: JobModel
    worker: WorkerModel


def fenced(
    *, session: Session, worker: WorkerModel, lease_id: str, fencing_token: int, allow_ended: bool = False,
) -> FencedLease:
    """The worker's lease, locked, if the token is current; otherwise `LeaseLost` (or 404 for another's lease).

    Locks are always taken job, then lease, then worker (as cancel, the reaper and placement do), and each
    locked row is re-read so no decision rests on a copy loaded before the lock.
    """
    peek = session.get(LeaseModel, lease_id)
    if peek is None or peek.worker_id != worker.id:
        raise NotFound(f"No such lease: {lease_id}", param="lease_id", code="lease_not_found")
    job = session.get(JobModel, peek.job_id, with_for_update=True, populate_existing=True)
    lease = session.get(LeaseModel, lease_id, with_for_update=True, populate_existing=True)
    assert job is not None and lease is not None
    if fencing_token != lease.fencing_token or job.fencing_token != lease.fencing_token:
        raise LeaseLost(f"Lease {lease_id} is no longer current (fencing token {fencing_token}, "
                        f"job {job.id} is at {job.fencing_token}); stop this job.", param="Tunegrid-Fencing-Token")
    if lease.status not in LIVE_LEASE and not allow_ended:
        raise LeaseLost(f"Lease {lease_id} has ended ({lease.status.value}: {lease.end_reason}); stop this job.")
    worker_row = session.get(WorkerModel, worker.id, with_for_update=True, populate_existing=True)
    assert worker_row is not None
    return FencedLease(lease=lease, job=job, worker=worker_row)


def already_ended(f: FencedLease, status: LeaseStatus) -> bool:
    """A repeated report of how the lease ended answers like the first; a different one is a conflict."""
    if f.lease.status in LIVE_LEASE:
        return False
    if f.lease.status is status:
        return True
    raise LeaseLost(f"Lease {f.lease.id} already ended as {f.lease.status.value}; stop this job.")


def training_only(f: FencedLease, what: str) -> None:
    """Only a training lease uploads checkpoints and adapters, or reports steps: a verifier reports figures."""
    if f.lease.kind != "train":
        raise Conflict(f"A {f.lease.kind} lease does not {what}; it completes with its figures.",
                       code="wrong_lease_kind")

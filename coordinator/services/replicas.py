"""Redundant training (`verification: "redundant"`): the job trains twice, from scratch, on two independent
providers; each adapter is verified (`verification.py`), and their held-out losses must agree.

This module owns the money of a replica that waits: once its verifiers confirm it, a replica's training lease
is neither billed nor paid until the other replica is decided. Its charge counts as committed meanwhile
(`pending_charge`: budgets, holds and the job's cost include it), and it is settled, until its end, when the
job ends however it ends (`settle_pending`, from `job_states.change_status`), unless the comparison refuted it.

A replica is a dict in `job.verification["replicas"]`: the training lease (`lease_id`), its trainer
(`worker_id`, `provider_id`), what its verifiers measured (`heldout_adapter_loss`, `heldout_base_loss`), its
estimated `charge`, and its `outcome`: confirmed (waiting), delivered (the job's adapter), settled, refuted.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from coordinator.db.tables import Book, JobModel, LeaseModel, WorkerModel
from coordinator.services import ledger, metering
from shared.pricing import cost_for_seconds

TRAININGS = {"redundant": 2}
WAITING = "confirmed"


def trainings(mode: str) -> int:
    """How many times a job of this verification mode trains (what its quote and hold cover)."""
    return TRAININGS.get(mode, 1)


def of(job: JobModel) -> list[dict[str, Any]]:
    return list((job.verification or {}).get("replicas") or [])


def waiting(job: JobModel) -> list[dict[str, Any]]:
    return [r for r in of(job) if r["outcome"] == WAITING]


def pending_charge(job: JobModel) -> int:
    """What the job's confirmed, not yet settled replicas will be charged (committed, not yet billed)."""
    return sum(int(r.get("charge") or 0) for r in waiting(job))


def providers(job: JobModel) -> list[str]:
    return [r["provider_id"] for r in of(job)]


def charge_of(job: JobModel, lease: LeaseModel) -> int:
    """The charge a replica's training lease will settle at (until its end; the metering caps it at max_cost)."""
    if lease.training_started_at is None or lease.ended_at is None:
        return 0
    seconds = max(int((lease.ended_at - lease.training_started_at).total_seconds()), 0)
    return cost_for_seconds(lease.price_per_gpu_hour, seconds)


def mark(job: JobModel, lease_id: str, outcome: str) -> None:
    job.verification = {**(job.verification or {}),
                        "replicas": [{**r, "outcome": outcome} if r["lease_id"] == lease_id else r for r in of(job)]}


def lock_books(session: Session, job: JobModel, *others: str) -> None:
    """Lock the balances settling the job's waiting replicas moves (the customer's, their providers'), with
    `others`, in the ledger's one order: call before anything else in the transaction posts."""
    owners = {*others, *(r["provider_id"] for r in waiting(job))}
    ledger.lock_balances(session, [(Book.customer_available, job.account_id),
                                   *((Book.provider_payable, owner) for owner in owners)])


def settle_pending(session: Session, job: JobModel) -> None:
    """The job ends (the caller holds its lock): each waiting replica's training is metered until its end (its
    verifiers confirmed it; no comparison refuted it)."""
    pending = waiting(job)
    if not pending:
        return
    lock_books(session, job)
    for replica in pending:
        lease = session.get(LeaseModel, replica["lease_id"], with_for_update=True, populate_existing=True)
        assert lease is not None and lease.ended_at is not None
        worker = session.get(WorkerModel, lease.worker_id)
        assert worker is not None
        metering.meter_lease(session=session, lease=lease, job=job, worker=worker, rule="until_end",
                             ended_at=lease.ended_at, usage=lease.usage)
        mark(job, lease.id, "settled")

"""Redundant training (`verification: "redundant"`): the job trains twice, from scratch, on two independent
providers; each adapter is verified (`verification.py`), and their held-out losses must agree.

This module owns the money of a replica that waits: once its verifiers confirm it, a replica's training lease
is neither billed nor paid until the other replica is decided. Its charge counts as committed meanwhile
(`pending_charge`: budgets, holds and the job's cost include it), and it is settled, until its end, when the
job ends however it ends (`metering.settle_waiting`, from `job_states.change_status`), unless the comparison
refuted it. `metering` also keeps a waiting replica's charge out of the next training's `max_cost`.

A replica is a dict in `job.verification["replicas"]`: the training lease (`lease_id`), its trainer
(`worker_id`, `provider_id`), what its verifiers measured (`heldout_adapter_loss`, `heldout_base_loss`), its
estimated `charge`, and its `outcome`: confirmed (waiting), delivered (the job's adapter), settled, refuted.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from coordinator.db.tables import Book, JobModel
from coordinator.services import ledger

TRAININGS = {"redundant": 2}
WAITING = "confirmed"


def trainings(mode: str) -> int:
    """How many times a job of this verification mode trains (what its quote and hold cover)."""
    return TRAININGS.get(mode, 1)


def of(job: JobModel) -> list[dict[str, Any]]:
    return list((job.verification or {}).get("replicas") or [])


def waiting(job: JobModel) -> list[dict[str, Any]]:
    return [r for r in of(job) if r["outcome"] == WAITING]


def pending_charge(job: JobModel, *, besides: str | None = None) -> int:
    """What the job's confirmed, not yet settled replicas (but the lease `besides`) will be charged (committed,
    not yet billed)."""
    return sum(int(r.get("charge") or 0) for r in waiting(job) if r["lease_id"] != besides)


def providers(job: JobModel) -> list[str]:
    return [r["provider_id"] for r in of(job)]


def mark(job: JobModel, lease_id: str, outcome: str) -> None:
    job.verification = {**(job.verification or {}),
                        "replicas": [{**r, "outcome": outcome} if r["lease_id"] == lease_id else r for r in of(job)]}


def lock_books(session: Session, job: JobModel, *others: str) -> None:
    """Lock the balances settling the job's waiting replicas moves (the customer's, their providers'), with
    `others`, in the ledger's one order: call before anything else in the transaction posts."""
    owners = {*others, *(r["provider_id"] for r in waiting(job))}
    ledger.lock_balances(session, [(Book.customer_available, job.account_id),
                                   *((Book.provider_payable, owner) for owner in owners)])

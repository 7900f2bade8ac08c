"""Work whose pay waits for a verdict: a redundant job's confirmed training, and the checkpoints of a verified
job's preempted leases.

Redundant training (`verification: "redundant"`): the job trains twice, from scratch, on two independent
providers; each adapter is verified (`verification.py`), and their held-out losses must agree. Once its verifiers
confirm it, a replica's training lease is neither billed nor paid until the other replica is decided. Its charge
counts as committed meanwhile (`pending_charge`: budgets, holds and the job's cost include it), and it is settled,
until its end, when the job ends however it ends (`metering.settle_waiting`, from `job_states.change_status`),
unless the comparison refuted it. `metering` also keeps a waiting replica's charge out of the next training's
`max_cost`.

A replica is a dict in `job.verification["replicas"]`: the training lease (`lease_id`), its trainer
(`worker_id`, `provider_id`), what its verifiers measured (`heldout_adapter_loss`, `heldout_base_loss`), its
estimated `charge`, its `withheld` leases (below), and its `outcome`: confirmed (waiting), delivered (the job's
adapter), settled, refuted.

Withheld checkpoints: in a job whose customer asked for verification ("always", "redundant"), a training lease
that ends early with a checkpoint (preempted, lost, a worker failure) is not billed until its checkpoint at once:
that checkpoint may become part of an adapter nobody has checked yet. Its entry (`lease_id`, `provider_id`,
`charge`) waits in `job.verification["withheld"]` (counted in `pending_charge`) and is settled by the verdict on
the training built on it, through that training's lineage (the leases whose checkpoints it resumed from, one
after another: `verification.lineage`): refuted, the entries of its lineage are not paid (their checkpoints are
quarantined, their providers are off the job) and the rest wait on;
confirmed, every entry is paid until its checkpoint, as when the job ends otherwise. An entry whose checkpoint
the coordinator confirmed bad (`forfeit`, from `checkpoints.quarantine`) is never paid; one merely set aside on
another worker's unconfirmable claim is paid (a rival's word costs nobody anything). A confirmed redundant
training takes its lineage's entries with it (paid when it settles, not when the comparison refutes it).
"""

from __future__ import annotations

from collections.abc import Collection
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


def withheld(job: JobModel) -> list[dict[str, Any]]:
    """The withheld checkpoints of the job's current training (the module's rule)."""
    return list((job.verification or {}).get("withheld") or [])


def withhold(job: JobModel, *, lease_id: str, provider_id: str, charge: int) -> None:
    job.verification = {**(job.verification or {}), "withheld": [
        *withheld(job), {"lease_id": lease_id, "provider_id": provider_id, "charge": charge}]}


def forfeit(job: JobModel, lease_id: str) -> None:
    """The checkpoint of a withheld lease proved bad (the coordinator confirmed it): it is never paid."""
    if any(w["lease_id"] == lease_id for w in withheld(job)):
        job.verification = {**(job.verification or {}), "withheld": [
            {**w, "forfeit": True} if w["lease_id"] == lease_id else w for w in withheld(job)]}


def take_withheld(job: JobModel, *, of_leases: Collection[str] | None = None) -> list[dict[str, Any]]:
    """Remove the current training's withheld entries (only those of the leases `of_leases`, when given) and return
    them."""
    taken = [w for w in withheld(job) if of_leases is None or w["lease_id"] in of_leases]
    if taken:
        job.verification = {**(job.verification or {}), "withheld": [w for w in withheld(job) if w not in taken]}
    return taken


def pending_charge(job: JobModel, *, besides: str | None = None) -> int:
    """What the job's waiting work (confirmed, not yet settled replicas and their withheld checkpoints, the
    current training's withheld checkpoints), but the lease `besides`, will be charged (committed, not yet
    billed)."""
    entries = [*withheld(job)]
    for replica in waiting(job):
        entries += [replica, *(replica.get("withheld") or [])]
    return sum(int(e.get("charge") or 0) for e in entries if e["lease_id"] != besides)


def providers(job: JobModel) -> list[str]:
    return [r["provider_id"] for r in of(job)]


def waiting_providers(job: JobModel) -> set[str]:
    """Every provider whose pay waits on the job (the module's rule)."""
    owners = {w["provider_id"] for w in withheld(job)}
    for replica in waiting(job):
        owners |= {replica["provider_id"], *(w["provider_id"] for w in replica.get("withheld") or [])}
    return owners


def mark(job: JobModel, lease_id: str, outcome: str) -> None:
    job.verification = {**(job.verification or {}),
                        "replicas": [{**r, "outcome": outcome} if r["lease_id"] == lease_id else r for r in of(job)]}


def lock_books(session: Session, job: JobModel, *others: str) -> None:
    """Lock the balances settling the job's waiting work moves (the customer's, their providers'), with
    `others`, in the ledger's one order: call before anything else in the transaction posts."""
    owners = {*others, *waiting_providers(job)}
    ledger.lock_balances(session, [(Book.customer_available, job.account_id),
                                   *((Book.provider_payable, owner) for owner in owners)])

"""Per-second metering: what one lease is billed, decided once, when it ends.

Billable time is training time the coordinator saw, on its own clock: from the first progress the lease
reported (`training_started_at`; setup and the model download before it are free) to the lease's end, never
more than `UNSEEN_SLACK` past the last time the coordinator heard from the worker. How the lease ended
decides where billing stops:

- completed, cancelled or paused by the customer, stopped at `max_cost`, or failed on the customer's own
  data: until the end (`until_end`);
- the worker failed, vanished, was revoked, or its owner took the PC back: only the work kept in the last
  checkpoint this lease uploaded, none without one (`until_checkpoint`); the next worker resumes from
  that checkpoint, so the customer never pays twice for the same steps;
- the worker's adapter failed its checks, or a worker's claim went unconfirmed: nothing (`not_billed`).

A training lease whose adapter is being verified (`verification.py`) is metered when the verdict comes: until
its end when the adapter is confirmed, nothing when it is refuted; so is, in a job whose customer asked for
verification, a lease that ended early with a checkpoint (withheld, `replicas.py`). A verification lease is the
platform's cost: the customer pays nothing for it, the verifier earns its ask, booked to the platform's
verification book.

The worker's own measurement is compared: when it says it worked less than we saw (`until_end` leases),
the lower figure is billed and the record says so. A job's `max_cost` caps the charge, less what a redundant
job's confirmed training waiting to settle will be charged (`replicas.py`). The customer pays
`ceil(seconds * price / 3600)` micro-dollars, the provider earns `floor(seconds * ask / 3600)`, and the
platform keeps the difference.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.db.tables import (
    BatchRequestModel, FileModel, JobCheckpointModel, JobModel, LeaseKind, LeaseModel, LeaseStatus, UsageRecordModel, WorkerModel,
)
from coordinator.services import billing, replicas
from shared.pricing import cost_for_seconds, provider_earnings, seconds_for_budget

UNSEEN_SLACK = timedelta(seconds=30)  # time past the last word from the worker that is still billed
REPORT_TOLERANCE_S = 5.0  # a worker's report this much below ours counts as lower


VERIFY_MIN_S = 120  # the least a verification lease may bill: a small job's forward passes and their overheads
VERIFY_SLACK = 5  # a verification may take this many times its expected forward passes
FORWARDS_PER_STEP = 4  # a QLoRA step is about four forward passes of work (forward, recompute, backward at 2x)


def verification_seconds(session: Session, job: JobModel, lease: LeaseModel) -> int:
    """The most seconds a verification lease of this job is paid for: `VERIFY_SLACK` times two forward passes (base
    and adapter) over the held-out and validation examples at the lease's GPU class's expected speed, at least
    `VERIFY_MIN_S`. A verifier that keeps its lease open longer is not paid for it."""
    from shared.catalog import get_base_model  # noqa: PLC0415
    from shared.pricing import expected_tokens_per_s, get_gpu_class  # noqa: PLC0415

    training = session.get(FileModel, job.training_file_id)
    validation = session.get(FileModel, job.validation_file_id) if job.validation_file_id else None
    examples = max((training.examples if training else 0) or 1, 1)
    per_example = (job.estimated_tokens / max(int(job.hyperparameters.get("n_epochs", 1)), 1)) / examples
    held = (job.held_out or {}).get("examples", 0)
    valid = (validation.examples or 0) if validation else math.ceil(0.1 * (examples - held))
    tokens = 2 * per_example * (held + valid)
    tps = expected_tokens_per_s(get_base_model(job.model), get_gpu_class(lease.gpu_class)) * FORWARDS_PER_STEP
    return max(VERIFY_MIN_S, math.ceil(VERIFY_SLACK * tokens / max(tps, 1e-9)))


def rule_for(status: LeaseStatus, *, failed_check: bool, counts_against_worker: bool) -> str:
    if failed_check:
        return "not_billed"
    if status in (LeaseStatus.completed, LeaseStatus.cancelled):
        return "until_end"
    if status is LeaseStatus.failed:
        return "until_checkpoint" if counts_against_worker else "until_end"  # else: the customer's data
    return "until_checkpoint"  # lost, preempted


def _last_checkpoint_at(session: Session, lease: LeaseModel) -> datetime | None:
    """The lease's last kept work: its latest checkpoint, or for a batch lease its latest answer recorded."""
    if lease.kind == LeaseKind.batch:
        return session.scalar(select(func.max(BatchRequestModel.answered_at)).where(
            BatchRequestModel.lease_id == lease.id))
    return session.scalar(select(func.max(JobCheckpointModel.created_at)).where(JobCheckpointModel.lease_id == lease.id))


def _seen_until(lease: LeaseModel, until: datetime | None) -> datetime | None:
    """Billing stops at `until`, but never more than `UNSEEN_SLACK` past the last word from the worker."""
    if until is not None and lease.last_renewed_at is not None and lease.training_started_at is not None:
        until = min(until, max(lease.last_renewed_at, lease.training_started_at) + UNSEEN_SLACK)
    return until


def _reported(usage: dict[str, Any] | None) -> float | None:
    return float(usage["wall_seconds"]) if usage and usage.get("wall_seconds") else None


def _billable(observed: float, usage: dict[str, Any] | None) -> tuple[int, list[str]]:
    """Whole seconds billed for `observed` seconds, or the worker's own lower figure in `usage` (until-end leases)."""
    reported = _reported(usage)
    if reported is not None and reported < observed - REPORT_TOLERANCE_S:
        return math.floor(reported), [f"the worker reported {reported:.0f} s, the coordinator saw {observed:.0f} s; "
                                      "billed the lower"]
    return math.floor(observed), []


def _charge(lease: LeaseModel, until: datetime | None, usage: dict[str, Any] | None) -> int:
    until = _seen_until(lease, until)
    if lease.training_started_at is None or until is None:
        return 0
    seconds, _ = _billable(max((until - lease.training_started_at).total_seconds(), 0.0), usage)
    return cost_for_seconds(lease.price_per_gpu_hour, seconds)


def until_end_charge(lease: LeaseModel) -> int:
    """What an ended lease will be charged when metered until its end, before any max_cost cap (a redundant job's
    confirmed training waiting to settle, `replicas.py`)."""
    return _charge(lease, lease.ended_at, lease.usage)


def until_checkpoint_charge(session: Session, lease: LeaseModel) -> int:
    """What an ended lease will be charged when metered until its last checkpoint, before any max_cost cap (a
    withheld checkpoint, `replicas.py`)."""
    return _charge(lease, _last_checkpoint_at(session, lease), None)


def meter_lease(
    *, session: Session, lease: LeaseModel, job: JobModel, worker: WorkerModel, rule: str, ended_at: datetime,
    usage: dict[str, Any] | None,
) -> UsageRecordModel | None:
    """Write the lease's usage record and settle it in the ledger (the caller holds the job's lock). A lease
    that never started training has nothing to bill and gets no record."""
    job.accruing_since = job.accruing_price = None
    start = lease.training_started_at
    if start is None:
        return None
    until: datetime | None = None
    if rule != "not_billed":
        until = _seen_until(lease, ended_at if rule == "until_end" else _last_checkpoint_at(session, lease))
    observed = max((until - start).total_seconds(), 0.0) if until is not None else 0.0
    seconds, notes = _billable(observed, usage if rule == "until_end" else None)
    reported = _reported(usage)
    verifying = lease.kind == LeaseKind.verify
    ask = lease.ask_price_per_gpu_hour
    if verifying:
        cap = verification_seconds(session, job, lease)
        if seconds > cap:
            notes.append(f"capped at {cap} s, what verifying this job can take")
            seconds = cap
        trained = session.get(LeaseModel, (job.verification or {}).get("lease_id") or "")
        if trained is not None and trained.ask_price_per_gpu_hour < ask:
            notes.append("paid at the ask of the training it checked")
            ask = trained.ask_price_per_gpu_hour
    if job.max_cost is not None and not verifying:
        committed = job.billed_micros + replicas.pending_charge(job, besides=lease.id)  # a waiting training's share
        budget = seconds_for_budget(lease.price_per_gpu_hour, max(job.max_cost - committed, 0))
        if seconds > budget:
            notes.append(f"capped at {budget} s by max_cost")
            seconds = budget
    charge = 0 if verifying else cost_for_seconds(lease.price_per_gpu_hour, seconds)
    earned = provider_earnings(ask, seconds)
    if not verifying:
        earned = min(earned, charge)
    record = UsageRecordModel(
        lease_id=lease.id, job_id=job.id, customer_id=job.account_id, provider_id=worker.account_id,
        worker_id=worker.id, gpu_class=lease.gpu_class, price_per_gpu_hour=lease.price_per_gpu_hour,
        ask_price_per_gpu_hour=lease.ask_price_per_gpu_hour, rule=rule, started_at=start, billed_until=until,
        observed_seconds=round(observed, 3), reported_seconds=reported, billable_seconds=seconds,
        charge_micros=charge, provider_micros=earned, fee_micros=0 if verifying else charge - earned,
        note="; ".join(notes) or None, usage_day=ended_at.date(), created_at=ended_at,
    )
    session.add(record)
    if verifying:
        billing.settle_verification(session=session, job=job, record=record)
    else:
        billing.settle(session=session, job=job, record=record)
    return record


def settle_replica(session: Session, job: JobModel, lease_id: str, outcome: str) -> LeaseModel:
    """A redundant job's waiting training (`replicas.py`) is marked `outcome` and metered until its end, its
    withheld checkpoints until theirs (the caller holds the job's lock and has locked its books:
    `replicas.lock_books`)."""
    replica = next(r for r in replicas.of(job) if r["lease_id"] == lease_id)
    replicas.mark(job, lease_id, outcome)  # no longer waiting: its charge is what this settles
    lease = meter_ended(session, job, lease_id, "until_end")
    settle_withheld(session, job, replica.get("withheld") or [])  # but those forfeit
    return lease


def settle_withheld(session: Session, job: JobModel, entries: list[dict[str, Any]], *,
                    unpaid: Collection[str] = ()) -> None:
    """Withheld checkpoints (`replicas.py`, taken from the job or a replica) are metered until their checkpoint,
    or not at all for the leases `unpaid` and those forfeit (the caller holds the job's lock and has locked its
    books)."""
    for entry in entries:
        unpaid_here = entry["lease_id"] in unpaid or entry.get("forfeit")
        meter_ended(session, job, entry["lease_id"], "not_billed" if unpaid_here else "until_checkpoint")


def meter_ended(session: Session, job: JobModel, lease_id: str, rule: str) -> LeaseModel:
    """An ended lease whose metering waited (a verdict's, a withheld checkpoint's) is metered by `rule` (the caller
    holds the job's lock and has locked the books it moves)."""
    lease = session.get(LeaseModel, lease_id, with_for_update=True, populate_existing=True)
    assert lease is not None and lease.ended_at is not None
    worker = session.get(WorkerModel, lease.worker_id)
    assert worker is not None
    meter_lease(session=session, lease=lease, job=job, worker=worker, rule=rule, ended_at=lease.ended_at,
                usage=lease.usage)
    return lease


def settle_waiting(session: Session, job: JobModel) -> None:
    """The job ends (the caller holds its lock): each redundant training that waits, confirmed by its verifiers
    and refuted by no comparison, is metered until its end, and every withheld checkpoint until its checkpoint
    (`replicas.py`)."""
    if not replicas.waiting_providers(job):
        return
    replicas.lock_books(session, job)
    for replica in replicas.waiting(job):
        settle_replica(session, job, replica["lease_id"], "settled")
    settle_withheld(session, job, replicas.take_withheld(job))

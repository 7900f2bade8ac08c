"""The jobs' money, swept every few seconds: a running job whose cost nears its hold holds more; one that would
pass its `max_cost` stops at its last checkpoint and fails with `max_cost_reached`; one whose customer has no
credit left to hold pauses (`insufficient_balance` in its events) and resumes from its last checkpoint after
a top-up. A job back in the queue whose hold a lease used up (placement passes over it) holds again, or
pauses the same way. Idempotent and safe in any number of processes (jobs are taken with SKIP LOCKED).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.tables import Book, JobCheckpointModel, JobKind, JobModel, JobStatus, utcnow
from coordinator.effects import effects
from coordinator.services import batch_rows, billing, holds, ledger, replicas, results
from coordinator.services.job_states import change_status, record_event
from coordinator.services.lease_states import end_live_leases
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from coordinator.stores import open_store
from shared.errors import Conflict, InsufficientQuota
from shared.money import micros_to_usd
from shared.pricing import cost_for_seconds

SWEEP_BATCH = 1000


def _seconds(since: datetime, now: datetime) -> int:
    return max(int((now - since).total_seconds()), 0)


def _last_checkpoint(session: Session, job: JobModel) -> str:
    checkpoint = session.scalars(
        select(JobCheckpointModel).where(JobCheckpointModel.job_id == job.id, JobCheckpointModel.resumable())
        .order_by(JobCheckpointModel.step_number.desc(), JobCheckpointModel.id.desc()).limit(1)).first()
    if checkpoint is None:
        return "it had saved no checkpoint yet"
    return f"its last checkpoint {checkpoint.id} (step {checkpoint.step_number}) is kept"


def stop_at_max_cost(session: Session, job: JobModel, settings: CoordinatorSettings) -> None:
    """The job reached its max_cost: it stops and fails, or, a redundant job with a confirmed training, delivers
    that (`results.deliver_uncompared`)."""
    assert job.max_cost is not None
    end_live_leases(session=session, job=job, reason="the job reached its max_cost")
    why = f"the job reached its max_cost of ${micros_to_usd(job.max_cost)} before its next training finished"
    if results.deliver_uncompared(session=session, store=open_store(settings), job=job, why=why):
        return
    message = (f"The job reached its max_cost of ${micros_to_usd(job.max_cost)} and was stopped "
               f"(charged ${micros_to_usd(job.billed_micros)}); {_last_checkpoint(session, job)}")
    change_status(session=session, job=job, to=JobStatus.failed, message=message,
                  error={"code": "max_cost_reached", "message": message, "param": "max_cost"})


def pause_for_balance(session: Session, job: JobModel, available: int) -> None:
    end_live_leases(session=session, job=job, reason="the customer's balance ran out")
    change_status(session=session, job=job, to=JobStatus.paused, level="warn",
                  message=f"Paused: insufficient balance (${micros_to_usd(available)} available) to keep running; "
                          f"{_last_checkpoint(session, job)}. Top up and resume to continue from it.",
                  data={"code": "insufficient_balance"})


def _end_for_balance(session: Session, job: JobModel, available: int, *, store: BlobStore) -> None:
    """An export or a batch whose hold ran out with nothing left to hold: it stops, billed until now (a batch's
    answers so far go to its output file)."""
    end_live_leases(session=session, job=job, reason="the customer's balance ran out")
    if job.kind == JobKind.batch:
        batch_rows.finalize(session=session, store=store, batch=job)
    message = f"Insufficient balance (${micros_to_usd(available)} available) to keep the {job.kind} running"
    change_status(session=session, job=job, to=JobStatus.failed, message=message,
                  error={"code": "insufficient_quota", "message": message, "param": None})


def _review(session: Session, job: JobModel, now: datetime, lookahead_s: int, settings: CoordinatorSettings) -> str | None:
    assert job.accruing_since is not None and job.accruing_price is not None
    seconds = _seconds(job.accruing_since, now)
    pending = replicas.pending_charge(job)  # a redundant job's confirmed training, charged when it settles
    running = cost_for_seconds(job.accruing_price, seconds) + pending
    ahead = cost_for_seconds(job.accruing_price, seconds + lookahead_s) + pending
    if job.max_cost is not None and job.billed_micros + ahead >= job.max_cost:
        stop_at_max_cost(session, job, settings)
        return "stopped"
    if ahead <= job.held_micros:
        return None
    want = max(job.held_micros, ahead - job.held_micros)  # doubling keeps the sweeps rare
    if job.max_cost is not None:
        want = min(want, job.max_cost - job.billed_micros - job.held_micros)
    available = ledger.balance(session, Book.customer_available, job.account_id, for_update=True)
    take = min(want, max(available, 0))
    if take > 0:
        billing.place_hold(session=session, job=job, amount=take, reason="the running job needs more")
        record_event(session=session, job=job, message=f"Held ${micros_to_usd(take)} more on your balance "
                                                      f"(${micros_to_usd(job.held_micros)} held for this job)")
    if running >= job.held_micros:
        if job.kind != JobKind.fine_tuning:  # an export or a batch has no pause to resume from: it ends
            _end_for_balance(session, job, available - take, store=open_store(settings))
            return "failed"
        pause_for_balance(session, job, available - take)
        return "paused"
    return "extended" if take > 0 else None


def _rehold(session: Session, job: JobModel, settings: CoordinatorSettings) -> str:
    try:
        holds.hold_for_queue(session=session, job=job, settings=settings)
    except InsufficientQuota:
        available = ledger.balance(session, Book.customer_available, job.account_id)
        if job.kind != JobKind.fine_tuning:  # an export or a batch has no pause to resume from: it ends
            if job.kind == JobKind.batch:  # with what it was billed for in its output file
                batch_rows.finalize(session=session, store=open_store(settings), batch=job)
            change_status(session=session, job=job, to=JobStatus.failed,
                          message=f"Insufficient balance (${micros_to_usd(available)} available) to hold the {job.kind}'s "
                                  f"cost: top up and ask for the {job.kind} again",
                          error={"code": "insufficient_quota", "message": f"Your balance cannot cover this {job.kind}'s "
                                 "estimated cost.", "param": None})
            return "failed"
        change_status(session=session, job=job, to=JobStatus.paused, level="warn",
                      message=f"Paused: insufficient balance (${micros_to_usd(available)} available) to hold the "
                              f"rest of the job; {_last_checkpoint(session, job)}. Top up and resume to continue.",
                      data={"code": "insufficient_balance"})
        return "paused"
    except Conflict:  # max_cost already reached by the leases so far
        stop_at_max_cost(session, job, settings)
        return "stopped"
    record_event(session=session, job=job, message=f"${micros_to_usd(job.held_micros)} held again on your balance")
    effects(session).placeable = True
    return "reheld"


def _locked(session: Session, job_id: str) -> JobModel | None:
    return session.scalars(select(JobModel).where(JobModel.id == job_id).with_for_update(skip_locked=True)
                           .execution_options(populate_existing=True)).first()


def enforce_budgets(*, session: Session, settings: CoordinatorSettings) -> dict[str, int]:
    now = utcnow()
    lookahead_s = int(2 * settings.sweep_interval_s) + 5
    counts = {"extended": 0, "stopped": 0, "paused": 0, "reheld": 0, "failed": 0}
    running = list(session.scalars(select(JobModel.id).where(
        JobModel.status == JobStatus.running, JobModel.accruing_since.is_not(None)).order_by(JobModel.id)
        .limit(SWEEP_BATCH)))
    unheld = list(session.scalars(select(JobModel.id).where(
        JobModel.status == JobStatus.queued, JobModel.held_micros <= 0, JobModel.stage.in_(("train", "export", "batch")))
        .order_by(JobModel.id).limit(SWEEP_BATCH)))  # a verifier is the platform's to pay: that job needs no hold
    session.rollback()
    for job_id in running:
        job = _locked(session, job_id)
        outcome = None
        if job is not None and job.status is JobStatus.running and job.accruing_since is not None:
            outcome = _review(session, job, now, lookahead_s, settings)
        session.commit()
        if outcome:
            counts[outcome] += 1
    for job_id in unheld:
        job = _locked(session, job_id)
        outcome = None
        if job is not None and job.status is JobStatus.queued and job.held_micros <= 0:
            outcome = _rehold(session, job, settings)
        session.commit()
        if outcome:
            counts[outcome] += 1
    return counts

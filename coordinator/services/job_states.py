"""The one place a job's status changes: allowed transitions, timestamps, the event each change writes, and
the release of the job's hold when it finishes or pauses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, insert, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.exc import StaleDataError

from coordinator.db.ids import new_id
from coordinator.effects import effects
from coordinator.services import billing, metering, replicas
from coordinator.db.tables import JobEventModel, JobModel, JobStatus, utcnow
from shared.errors import Conflict

S = JobStatus
TERMINAL = frozenset({S.succeeded, S.failed, S.cancelled})
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.validating_files: frozenset({S.queued, S.failed, S.cancelled}),
    # queued -> succeeded: a job that waited for a verifier in vain is released unverified (verification.py).
    S.queued: frozenset({S.running, S.paused, S.succeeded, S.failed, S.cancelled}),
    # running -> queued: the worker was lost or preempted; the job resumes from its last checkpoint elsewhere.
    S.running: frozenset({S.queued, S.paused, S.succeeded, S.failed, S.cancelled}),
    S.paused: frozenset({S.queued, S.cancelled, S.failed}),
    S.succeeded: frozenset(),
    S.failed: frozenset(),
    S.cancelled: frozenset(),
}


def exclude(job: JobModel, *, provider: str | None = None, worker: str | None = None) -> None:
    """Never place the job on this provider's machines (or on this one machine) again (placement reads it)."""
    if provider is not None and provider not in (job.excluded_providers or []):
        job.excluded_providers = [*(job.excluded_providers or []), provider]
    if worker is not None and worker not in (job.excluded_workers or []):
        job.excluded_workers = [*(job.excluded_workers or []), worker]


def record_event(
    *, session: Session, job: JobModel, message: str, level: str = "info", type: str = "message",
    data: dict[str, Any] | None = None,
) -> JobEventModel:
    event = JobEventModel(id=new_id("ftevent-"), job=job, level=level, type=type, message=message, data=data)
    session.add(event)
    return event


def change_status(
    *, session: Session, job: JobModel, to: JobStatus, message: str, level: str = "info",
    error: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
) -> JobEventModel:
    """Move `job` to `to` and write the event that says so; an illegal move raises `Conflict`.

    The caller commits, so the status and its event land together.
    """
    if to not in TRANSITIONS[job.status]:
        raise Conflict(f"Job {job.id} is {job.status.value} and cannot become {to.value}.", code="invalid_job_state")
    job.status = to
    if to in TERMINAL:
        job.finished_at = utcnow()
    if to in TERMINAL or to in (S.queued, S.paused):  # the running trainer's estimate no longer holds
        job.estimated_finish = None
    if to in TERMINAL:
        metering.settle_waiting(session, job)  # confirmed trainings of a redundant job are paid however it ends
    if to in TERMINAL or to is S.paused:
        billing.release(session=session, job=job, reason=f"the job is {to.value}",
                        keep=replicas.pending_charge(job))
    if to is S.queued:
        effects(session).placeable = True  # a placement pass should look at it soon
    if to is S.failed:
        job.error = error or {"code": "failed", "message": message, "param": None}
    return record_event(
        session=session, job=job, message=message, level="error" if to is S.failed else level,
        data={"status": to.value, **(data or {})},
    )


@dataclass(frozen=True, slots=True)
class Move:
    """One job's part in `change_status_many`: the job as read (with its version), and what else changes."""

    job: JobModel
    message: str
    data: dict[str, Any]
    values: dict[str, Any]  # other columns set in the same UPDATE (e.g. the new fencing token)


_MOVE = (
    update(JobModel.__table__)
    .where(JobModel.__table__.c.id == bindparam("b_id"), JobModel.__table__.c.status == bindparam("b_from"),
           JobModel.__table__.c.version == bindparam("b_version"))
)


def change_status_many(*, session: Session, moves: list[Move], frm: JobStatus, to: JobStatus) -> None:
    """`change_status` for a batch (placement passes): one executemany UPDATE guarded by each job's status and
    version, and one INSERT of the events. Like the ORM's version check, any job changed meanwhile fails the
    whole batch with StaleDataError. Only moves between non-terminal states, whose only effect is the status."""
    if not moves:
        return
    if to not in TRANSITIONS[frm] or to in TERMINAL or to is S.queued:
        raise ValueError(f"change_status_many cannot move {frm.value} -> {to.value}")
    now = utcnow()
    columns = sorted(moves[0].values)
    statement = _MOVE.values(status=to.value, version=bindparam("b_next"), updated_at=bindparam("b_now"),
                             **{c: bindparam(f"v_{c}") for c in columns})
    rows = [{"b_id": m.job.id, "b_from": frm.value, "b_version": m.job.version, "b_next": m.job.version + 1,
             "b_now": now, **{f"v_{c}": m.values[c] for c in columns}} for m in moves]
    result = session.connection().execute(statement, rows)
    if result.rowcount != len(rows):
        raise StaleDataError(f"{len(rows) - result.rowcount} of {len(rows)} jobs changed during a batch status change")
    for m in moves:  # the loaded objects now say what the database says, without another UPDATE
        for column, value in {"status": to, "version": m.job.version + 1, "updated_at": now, **m.values}.items():
            set_committed_value(m.job, column, value)
    session.execute(insert(JobEventModel), [
        {"id": new_id("ftevent-"), "job_id": m.job.id, "created_at": now, "level": "info", "type": "message",
         "message": m.message, "data": {"status": to.value, **m.data}} for m in moves
    ])

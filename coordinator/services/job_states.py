"""The one place a job's status changes: allowed transitions, timestamps, and the event each change writes."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from coordinator.db.ids import new_id
from coordinator.effects import effects
from coordinator.db.models import JobEventModel, JobModel, JobStatus, utcnow
from shared.errors import Conflict

S = JobStatus
TERMINAL = frozenset({S.succeeded, S.failed, S.cancelled})
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.validating_files: frozenset({S.queued, S.failed, S.cancelled}),
    S.queued: frozenset({S.running, S.paused, S.failed, S.cancelled}),
    # running -> queued: the worker was lost or preempted; the job resumes from its last checkpoint elsewhere.
    S.running: frozenset({S.queued, S.paused, S.succeeded, S.failed, S.cancelled}),
    S.paused: frozenset({S.queued, S.cancelled, S.failed}),
    S.succeeded: frozenset(),
    S.failed: frozenset(),
    S.cancelled: frozenset(),
}


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
        job.estimated_finish = None
    if to is S.queued:
        effects(session).placeable = True  # a placement pass should look at it soon
    if to is S.failed:
        job.error = error or {"code": "failed", "message": message, "param": None}
    return record_event(
        session=session, job=job, message=message, level="error" if to is S.failed else level,
        data={"status": to.value, **(data or {})},
    )

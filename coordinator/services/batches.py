"""OpenAI's Batch API on the fleet, as the customer sees it: a batch of `/v1/chat/completions` requests (a `batch`
file) against a base model or the caller's `ft:` model or checkpoint, created, listed, retrieved and cancelled;
its output and error files in OpenAI's batch output format.

A batch is a job of its own (`jobs.kind == "batch"`) with a hold placed at creation (429 `insufficient_quota`
when the balance cannot cover the estimate) and one row per request (`BatchRequestModel`), answered once by the
first batch lease that reports it (`batch_leases.py`): a batch preempted or lost mid-way resumes elsewhere
without redoing or losing a request. Billed per second like training. Statuses: `validating` while its rows are
written, `in_progress` while queued or running, `completed`, `failed` (`expired` past its completion window),
`cancelled`; each end writes what was answered into the output and error files.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.db.tables import (
    AccountModel, BatchRequestModel, FileModel, FileStatus, JobKind, JobModel, JobStatus, utcnow,
)
from coordinator.services import batch_rows, continuation, files, holds, jobs, lease_states
from coordinator.services.job_states import TERMINAL, change_status
from coordinator.services.paging import page
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from shared.batches import ENDPOINT
from shared.catalog import BaseModelSpec, get_base_model
from shared.errors import InvalidRequest, NotFound
from shared.money import micros_to_usd
from shared.schemas.batches import BatchCreate


def _model(session: Session, account: AccountModel, name: str) -> tuple[BaseModelSpec, continuation.Start | None]:
    """The base to run and the adapter to load (None: the base alone) for a batch's model."""
    if continuation.is_continuation(name):
        try:
            start = continuation.resolve(session=session, account=account, name=name)
        except InvalidRequest as exc:
            raise InvalidRequest(exc.message, param="input_file_id", code=exc.code) from None
        return get_base_model(start.parent.model), start
    try:
        return get_base_model(name), None
    except InvalidRequest as exc:
        raise InvalidRequest(f"The batch's requests ask for model {name!r}, which is neither a base model nor one "
                             f"of your fine-tunes. {exc.message}", param="input_file_id",
                             code="model_not_found") from None


def _input_file(session: Session, account: AccountModel, file_id: str) -> FileModel:
    try:
        file = files.get(session=session, account=account, file_id=file_id, lock="share")
    except NotFound:
        raise InvalidRequest(f"File {file_id} not found.", param="input_file_id", code="file_not_found") from None
    if file.purpose != "batch" or file.status is not FileStatus.processed or not file.model:
        raise InvalidRequest(f"File {file_id} has purpose {file.purpose!r}; a batch's input is a file uploaded with "
                             "purpose 'batch'.", param="input_file_id", code="invalid_file")
    return file


def create(*, session: Session, store: BlobStore, account: AccountModel, request: BatchCreate,
           settings: CoordinatorSettings) -> JobModel:
    if request.endpoint != ENDPOINT:
        raise InvalidRequest(f"tunegrid batches {ENDPOINT} requests only, not {request.endpoint!r}.",
                             param="endpoint", code="invalid_value")
    if request.completion_window not in batch_rows.WINDOWS:
        raise InvalidRequest("completion_window must be '24h'.", param="completion_window", code="invalid_value")
    file = _input_file(session, account, request.input_file_id)
    base, start = _model(session, account, file.model or "")
    batch = batch_rows.new_batch(
        session=session, store=store, file=file, base=base, start=start, window=request.completion_window,
        metadata=request.metadata,
        output_expires_s=request.output_expires_after.seconds if request.output_expires_after else None)
    jobs.price_cap(session=session, job=batch, settings=settings)
    held = holds.hold_for_queue(session=session, job=batch, settings=settings)
    batch_rows.queue(session=session, batch=batch, message=f"Batch of {file.examples} requests against {file.model} "
                     f"queued; ${micros_to_usd(held)} held on your balance")
    session.commit()
    return batch


def get(*, session: Session, account: AccountModel, batch_id: str, for_update: bool = False) -> JobModel:
    batch = session.get(JobModel, batch_id, with_for_update=for_update or None)
    if batch is None or batch.account_id != account.id or batch.kind != JobKind.batch:
        raise NotFound(f"No such batch: {batch_id}", param="batch_id")
    return batch


def list_batches(*, session: Session, account: AccountModel, after: str | None, limit: int) -> tuple[list[JobModel], bool]:
    stmt = select(JobModel).where(JobModel.account_id == account.id, JobModel.kind == JobKind.batch.value)
    return page(session=session, stmt=stmt, id_column=JobModel.id, after=after, limit=limit)


@dataclass(frozen=True, slots=True)
class BatchView:
    """A batch with its request counts now, for the API to show."""

    batch: JobModel
    counts: dict[str, int]


def viewed(session: Session, rows: list[JobModel]) -> list[BatchView]:
    """The batches with their counts (one grouped query for all of them); commits the read."""
    found: dict[str, dict[str, int]] = {b.id: {"total": 0, "completed": 0, "failed": 0} for b in rows}
    if rows:
        for job_id, status, n in session.execute(select(
                BatchRequestModel.job_id, BatchRequestModel.status, func.count()).where(
                BatchRequestModel.job_id.in_(list(found))).group_by(BatchRequestModel.job_id, BatchRequestModel.status)):
            found[job_id]["total"] += n
            if status in ("completed", "failed"):
                found[job_id][status] += n
    views = [BatchView(batch=b, counts=found[b.id]) for b in rows]
    session.commit()
    return views


def view(*, session: Session, account: AccountModel, batch_id: str) -> BatchView:
    return viewed(session, [get(session=session, account=account, batch_id=batch_id)])[0]


def list_views(*, session: Session, account: AccountModel, after: str | None, limit: int) -> tuple[list[BatchView], bool]:
    rows, more = list_batches(session=session, account=account, after=after, limit=limit)
    return viewed(session, rows), more


def cancel(*, session: Session, store: BlobStore, account: AccountModel, batch_id: str) -> JobModel:
    batch = get(session=session, account=account, batch_id=batch_id, for_update=True)
    if batch.status is JobStatus.cancelled:
        return batch
    if batch.status in TERMINAL:
        raise InvalidRequest(f"Batch {batch_id} has already {status_name(batch)}; it cannot be cancelled.",
                             param="batch_id", code="invalid_batch_state")
    batch.batch = {**(batch.batch or {}), "cancelling_at": utcnow().isoformat()}
    lease_states.end_for_customer(session=session, job=batch, paused=False)
    made = batch_rows.finalize(session=session, store=store, batch=batch)
    change_status(session=session, job=batch, to=JobStatus.cancelled, message="Batch cancelled by the customer; "
                  "what was answered is in its output file")
    files.commit_made(session, store, made)
    return batch


def expire(*, session: Session, store: BlobStore, now: datetime | None = None, limit: int = 100) -> int:
    """Batches past their completion window (24 h) end `expired`: their live lease ends, what was answered is
    written to the output file, the rest of the hold goes back. How many expired."""
    now = now or utcnow()
    candidates = session.scalars(select(JobModel.id).where(
        JobModel.kind == JobKind.batch.value, JobModel.status.in_((JobStatus.queued, JobStatus.running)))
        .order_by(JobModel.id).limit(limit)).all()
    session.rollback()
    expired = 0
    for batch_id in candidates:
        batch = session.scalars(select(JobModel).where(JobModel.id == batch_id).with_for_update(skip_locked=True)
                                .execution_options(populate_existing=True)).first()
        if (batch is None or batch.status not in (JobStatus.queued, JobStatus.running)
                or datetime.fromisoformat((batch.batch or {})["expires_at"]) > now):
            session.rollback()
            continue
        lease_states.end_live_leases(session=session, job=batch, reason="the batch's completion window ended")
        made = batch_rows.finalize(session=session, store=store, batch=batch)
        batch.batch = {**batch.batch, "expired_at": now.isoformat()}  # type: ignore[dict-item]
        change_status(session=session, job=batch, to=JobStatus.failed, error={
            "code": "batch_expired", "message": "The batch did not finish within its completion window; what was "
            "answered is in its output file.", "param": None}, message="Batch expired")
        files.commit_made(session, store, made)
        expired += 1
    return expired


def status_name(batch: JobModel) -> str:
    """The batch's status in OpenAI's words."""
    state = batch.batch or {}
    if batch.status is JobStatus.validating_files:
        return "validating"
    if batch.status in (JobStatus.queued, JobStatus.running, JobStatus.paused):
        return "in_progress"
    if batch.status is JobStatus.succeeded:
        return "completed"
    if batch.status is JobStatus.cancelled:
        return "cancelled"
    return "expired" if state.get("expired_at") else "failed"

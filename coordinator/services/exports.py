"""A fine-tune's exports, as its customer asks for and sees them: request one (the job's final adapter or one of its
checkpoints, in the formats the model offers), list, retrieve, cancel.

An export is a job of its own (`export_rows.py`) that runs as an export lease on a provider's worker that holds the
base already (`export_leases.py` takes its uploads and completion), metered per second like training against a
hold placed when it is requested (429 `insufficient_quota` when the balance cannot cover the estimate).
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, JobCheckpointModel, JobKind, JobModel, JobStatus
from coordinator.services import continuation, holds, jobs, lease_states
from coordinator.services.export_rows import new_export
from coordinator.services.job_states import TERMINAL, change_status, record_event
from coordinator.services.paging import page
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from shared.catalog import get_base_model
from shared.errors import InvalidRequest, NotFound
from shared.money import micros_to_usd, usd_to_micros
from shared.schemas.exports import ExportCreate
from shared.weights import check_formats


def _start(session: Session, account: AccountModel, parent: JobModel,
           checkpoint: str | None) -> tuple[continuation.Start, str]:
    """The adapter to export and its name: the job's final one, or its checkpoint by id or name."""
    if checkpoint is None:
        if parent.status is not JobStatus.succeeded or not parent.fine_tuned_model:
            raise InvalidRequest(f"Job {parent.id} is {parent.status.value}: only a succeeded job's adapter, or one of "
                                 "its checkpoints (`checkpoint`), can be exported.", param="fine_tuning_job_id",
                                 code="invalid_job_state")
        name = parent.fine_tuned_model
    else:
        found = session.scalars(select(JobCheckpointModel).where(
            JobCheckpointModel.job_id == parent.id,
            (JobCheckpointModel.id == checkpoint) | (JobCheckpointModel.fine_tuned_model_checkpoint == checkpoint))
        ).first()
        if found is None:
            raise InvalidRequest(f"Job {parent.id} has no checkpoint {checkpoint!r}.", param="checkpoint",
                                 code="checkpoint_not_found")
        name = found.fine_tuned_model_checkpoint
    try:
        return continuation.resolve(session=session, account=account, name=name), name
    except InvalidRequest as exc:  # said of `model` there; here the export names it otherwise
        raise InvalidRequest(exc.message, param="checkpoint" if checkpoint else "fine_tuning_job_id",
                             code=exc.code) from None


def create(*, session: Session, store: BlobStore, account: AccountModel, job_id: str, request: ExportCreate,
           settings: CoordinatorSettings) -> JobModel:
    parent = jobs.get(session=session, account=account, job_id=job_id)
    base = get_base_model(parent.model)
    formats = check_formats(base, list(request.formats), param="formats")
    start, label = _start(session, account, parent, request.checkpoint)
    export = new_export(store=store, parent=parent, formats=formats, start=start, label=label,
                        max_cost=usd_to_micros(request.max_cost) if request.max_cost else None)
    if export.max_price_per_gpu_hour is None:
        jobs.price_cap(session=session, job=export, settings=settings)
    session.add(export)
    session.flush()
    held = holds.hold_for_queue(session=session, job=export, settings=settings)
    change_status(session=session, job=export, to=JobStatus.queued,
                  message=f"Export of {label} as {', '.join(formats)} queued; ${micros_to_usd(held)} held on your "
                          "balance")
    record_event(session=session, job=parent, message=f"Export {export.id} of {label} requested: {', '.join(formats)}",
                 data={"export_id": export.id})
    session.commit()
    return export


def get(*, session: Session, account: AccountModel, job_id: str, export_id: str, for_update: bool = False) -> JobModel:
    export = session.get(JobModel, export_id, with_for_update=for_update or None)
    if (export is None or export.account_id != account.id or export.kind != JobKind.export
            or export.parent_job_id != job_id):
        raise NotFound(f"No such export: {export_id}", param="export_id")
    return export


def list_exports(*, session: Session, account: AccountModel, job_id: str, after: str | None,
                 limit: int) -> tuple[list[JobModel], bool]:
    jobs.get(session=session, account=account, job_id=job_id)
    stmt = select(JobModel).where(JobModel.account_id == account.id, JobModel.kind == JobKind.export.value,
                                  JobModel.parent_job_id == job_id)
    return page(session=session, stmt=stmt, id_column=JobModel.id, after=after, limit=limit)


def cancel(*, session: Session, account: AccountModel, job_id: str, export_id: str) -> JobModel:
    export = get(session=session, account=account, job_id=job_id, export_id=export_id, for_update=True)
    if export.status is JobStatus.cancelled:
        return export
    if export.status in TERMINAL:
        raise InvalidRequest(f"Export {export_id} has already {export.status.value}; it cannot be cancelled.",
                             param="export_id", code="invalid_job_state")
    lease_states.end_for_customer(session=session, job=export, paused=False)
    change_status(session=session, job=export, to=JobStatus.cancelled, message="Export cancelled by the customer")
    session.commit()
    return export

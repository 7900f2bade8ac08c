"""The job row of an export: a fine-tune's adapter (or a checkpoint's) to be merged and converted on the fleet, made
from its fine-tuning job (`jobs.kind == "export"`, `parent_job_id`), queued for an export lease.

Made in two places: the export request (services/exports.py, which holds its cost at once) and the delivery of a
job that asked for exports at creation (services/results.py: the row starts with no hold, and the budgets sweep
places one or fails it). The adapter's blob gets the export's own name (`continuation.keep`), so deleting the result
file or pruning the checkpoint later cannot pull it from under the lease.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from coordinator.db.ids import new_id
from coordinator.db.tables import FileModel, JobKind, JobModel, JobStatus, LeaseKind
from coordinator.services import continuation, files
from coordinator.services.job_states import change_status, record_event
from coordinator.storage import BlobStore

EXPORT_PREFIX = "ftexp-"


def new_export(*, store: BlobStore, parent: JobModel, formats: list[str], start: continuation.Start, label: str,
               max_cost: int | None) -> JobModel:
    """The export's row (the caller adds it, holds its cost and queues it); `label`: what is exported, by name."""
    export = JobModel(
        id=new_id(EXPORT_PREFIX), kind=JobKind.export.value, parent_job_id=parent.id, account_id=parent.account_id,
        model=parent.model, method=parent.method, training_file_id=parent.training_file_id,
        status=JobStatus.validating_files, stage=LeaseKind.export.value, hyperparameters=dict(parent.hyperparameters),
        lora=dict(parent.lora), suffix=parent.suffix, seed=parent.seed,
        max_price_per_gpu_hour=parent.max_price_per_gpu_hour, max_price_source=parent.max_price_source,
        max_cost=max_cost, gpu_filter=parent.gpu_filter, trusted_hosts_only=parent.trusted_hosts_only,
        estimated_tokens=0, result_files=[], verification_mode="auto",
        export={"formats": formats, "model": label, "step": start.step, "files": []},
    )
    export.initial_adapter = continuation.keep(store=store, job=export, start=start)
    return export


def queue_asked(*, session: Session, store: BlobStore, parent: JobModel, result: FileModel) -> JobModel | None:
    """A fine-tuning job that asked for exports at creation has just succeeded with `result` (its adapter file,
    linked, not yet committed): its export, queued without a hold (the budgets sweep places one)."""
    asked = (parent.export or {}).get("formats")
    if not asked or (parent.export or {}).get("export_id"):
        return None
    start = continuation.Start(parent=parent, key=files.blob_key(result.id), sha256=result.sha256,
                               member=continuation.ADAPTER_MEMBER, step=None)
    export = new_export(store=store, parent=parent, formats=list(asked), start=start,
                        label=parent.fine_tuned_model or parent.id, max_cost=None)
    session.add(export)
    parent.export = {**parent.export, "export_id": export.id}
    change_status(session=session, job=export, to=JobStatus.queued,
                  message=f"Export of {export.export['model']} as {', '.join(asked)} queued (asked for at the job's "
                          "creation)")
    record_event(session=session, job=parent, message=f"Export {export.id} queued: {', '.join(asked)}",
                 data={"export_id": export.id})
    return export

"""A job's delivery: the checked adapter of one of its training leases becomes the customer's result file and
the job succeeds with it. The one place a `fine-tune-results` file is made, and a job named `ft:...`.

A redundant job (`replicas.py`) that cannot have its next training (its workers kept failing, its max_cost was
reached) is not failed while a training its verifiers confirmed waits: that one is delivered, uncompared
(`deliver_uncompared`); the customer was charged for it either way.

The file's blob name is linked to the upload before the caller commits (a committed file always has its
bytes); the caller deletes the upload's name after the commit, and the file's name if the commit fails.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from coordinator.db.ids import new_id
from coordinator.db.tables import FileModel, FileStatus, JobModel, JobStatus, LeaseKind, LeaseModel, utcnow
from coordinator.services import continuation, evaluations, export_rows, files, metering, replicas
from coordinator.services.job_states import change_status
from coordinator.storage import BlobStore


def deliver(*, session: Session, store: BlobStore, job: JobModel, lease: LeaseModel, how: str,
            data: dict[str, Any]) -> FileModel:
    """The job succeeds with `lease`'s adapter (checked, uploaded as `lease.adapter_key`) as its result file; the
    event says "The job has successfully completed with adapter <file>" and then `how`."""
    assert lease.adapter_key is not None and lease.adapter_sha256 is not None
    file = FileModel(
        id=new_id("file-"), account_id=job.account_id, filename=f"{job.id}-adapter.tar.gz",
        purpose="fine-tune-results", bytes=lease.adapter_bytes or 0, sha256=lease.adapter_sha256,
        status=FileStatus.processed, format="peft-lora", created_at=utcnow(),
    )
    session.add(file)
    store.copy(lease.adapter_key, files.blob_key(file.id))
    job.result_files = [file.id]
    job.trained_tokens = max(job.trained_tokens or 0, (lease.result or {}).get("trained_tokens") or 0)
    job.fine_tuned_model = continuation.fine_tuned_model_name(job)
    kept = _early_stopping(job, lease, lease.result or {})
    how = f"{how}; {kept}" if kept else how
    change_status(session=session, job=job, to=JobStatus.succeeded,
                  message=f"The job has successfully completed with adapter {file.id}{how}",
                  data={**data, "result_file": file.id})
    export_rows.queue_asked(session=session, store=store, parent=job, result=file)
    evaluations.queue_asked(session=session, store=store, parent=job, result=file)
    return file


def _early_stopping(job: JobModel, lease: LeaseModel, result: dict[str, Any]) -> str | None:
    """With early stopping, which step's adapter the job returns and why: the trainer's account, kept only when it
    fits the steps its lease reported (it moves no money: billing is by the second)."""
    if not job.early_stopping:
        return None
    best, steps = result.get("best_step"), min(result.get("steps") or 0, lease.last_step or 0)
    if not isinstance(best, int) or not 1 <= best <= steps:  # past what the lease reported: not believed
        return None
    stopped = bool(result.get("stopped_early"))
    reason = (f"validation loss stopped improving, so training stopped at step {steps} and the adapter of step "
              f"{best}, the best by validation loss, is kept" if stopped else
              f"training ran all {steps} steps; the adapter of step {best}, the best by validation loss, is kept")
    job.early_stopping = {**job.early_stopping, "best_step": best, "stopped_early": stopped, "reason": reason}
    return reason


def deliver_uncompared(*, session: Session, store: BlobStore, job: JobModel, why: str) -> bool:
    """The redundant job would fail because `why` (the caller holds its lock): if a training its verifiers
    confirmed waits, the best one is billed until its end and delivered instead, without the comparison, and
    True is returned. Its upload's name stays beside the result file's (a hard link: no second copy)."""
    waiting = sorted(replicas.waiting(job), key=lambda r: r["heldout_adapter_loss"])
    if not waiting:
        return False
    replicas.lock_books(session, job)
    best = waiting[0]
    lease = metering.settle_replica(session, job, best["lease_id"], "delivered")
    job.stage = LeaseKind.train.value
    file = deliver(session=session, store=store, job=job, lease=lease,
                   how=f"; {why}, so the training that its verifiers confirmed (held-out loss "
                       f"{best['heldout_adapter_loss']:.4f}, base {best['heldout_base_loss']:.4f}) is delivered "
                       "without the comparison of two trainings",
                   data={"verified": True, "compared": False, "heldout_base_loss": best["heldout_base_loss"],
                         "heldout_adapter_loss": best["heldout_adapter_loss"]})
    job.verification = {**(job.verification or {}), "status": "passed", "compared": False, "result_file": file.id}
    return True

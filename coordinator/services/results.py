"""A job's delivery: the checked adapter of one of its training leases becomes the customer's result file and
the job succeeds with it. The one place a `fine-tune-results` file is made, and a job named `ft:...`.

The file's blob name is linked to the upload before the caller commits (a committed file always has its
bytes); the caller deletes the upload's name after the commit, and the file's name if the commit fails.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from coordinator.db.ids import new_id
from coordinator.db.tables import FileModel, FileStatus, JobModel, JobStatus, LeaseModel, utcnow
from coordinator.services import files
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
    store.link(lease.adapter_key, files.blob_key(file.id))
    job.result_files = [file.id]
    job.trained_tokens = max(job.trained_tokens or 0, (lease.result or {}).get("trained_tokens") or 0)
    job.fine_tuned_model = f"ft:{job.model}:{job.account_id}:{job.suffix or ''}:{job.id}"
    change_status(session=session, job=job, to=JobStatus.succeeded,
                  message=f"The job has successfully completed with adapter {file.id}{how}",
                  data={**data, "result_file": file.id})
    return file

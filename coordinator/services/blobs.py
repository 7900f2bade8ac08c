"""Blobs have a life: what nothing will read again is deleted by a periodic task, so an untrusted worker's
uploads, a customer's expired files and ended jobs' scratch do not fill the coordinator's disk.

- files past their `expires_at` (no job still running on them) lose their content; the rows stay, as deleted;
- checkpoints of jobs that ended `scratch_retention_s` ago lose their content (they are listed still), and so do
  those jobs' copies of their training data: what trainers got and the held-out sample (`held_out.py`);
- a stored file no row refers to (a crash between storing and recording, a pruned checkpoint whose delete
  failed), an export's or a batch's uploads whose lease has ended, the adapter an ended job started from, an
  upload abandoned half way and a worker's direct upload never adopted (`incoming/`, object store) are deleted
  once older than `ORPHAN_GRACE`, so an upload in flight is never touched;
- what a direct upload's ticket let a worker write is deleted when the ticket lapses (`services/uploads.py`).
Both stores: the local disk and S3 (where a multipart upload never completed is aborted too).
Idempotent, and safe beside uploads: a blob is recorded before it is old enough to look orphaned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from coordinator.db.tables import LIVE_LEASE, FileModel, JobCheckpointModel, JobModel, JobStatus, LeaseModel, utcnow
from coordinator.services import held_out, uploads
from coordinator.services.files import blob_key
from coordinator.settings import CoordinatorSettings
from coordinator.storage import STAGING, BlobStore, checkpoint_key

ORPHAN_GRACE_S = 3600.0  # older than any upload could take to be recorded
# A multipart upload is aged from its start, not its last part: a relayed upload past what one PUT takes
# (5 GiB) over a slow uplink can run for hours, so only a day-old one counts as abandoned.
ABANDONED_UPLOAD_GRACE_S = 86_400.0
BATCH = 1000
ENDED = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


@dataclass(slots=True)
class Collected:
    files: int = 0
    checkpoints: int = 0
    held_out: int = 0  # ended jobs whose training copy and held-out sample were deleted
    orphans: int = 0
    keys: list[str] = field(default_factory=list)


def _expire_files(session: Session, store: BlobStore, collected: Collected) -> None:
    now = utcnow()
    running = select(JobModel.id).where(JobModel.status.not_in(ENDED), or_(
        JobModel.training_file_id == FileModel.id, JobModel.validation_file_id == FileModel.id)).exists()
    expired = session.scalars(select(FileModel).where(
        FileModel.expires_at <= now, FileModel.deleted_at.is_(None), ~running).limit(BATCH).with_for_update()).all()
    for file in expired:
        file.deleted_at = now
    session.commit()
    for file in expired:
        store.delete(blob_key(file.id))
        collected.files += 1


def _drop_scratch(session: Session, store: BlobStore, settings: CoordinatorSettings, collected: Collected) -> None:
    before = utcnow() - timedelta(seconds=settings.scratch_retention_s)
    stale = session.scalars(
        select(JobCheckpointModel).join(JobModel, JobModel.id == JobCheckpointModel.job_id)
        .where(JobModel.status.in_(ENDED), JobModel.finished_at <= before, JobCheckpointModel.blob_sha256.is_not(None))
        .limit(BATCH).with_for_update(of=JobCheckpointModel)).all()
    for checkpoint in stale:
        checkpoint.blob_sha256 = checkpoint.blob_bytes = None
    session.commit()
    for checkpoint in stale:
        store.delete(checkpoint_key(checkpoint.id))
        collected.checkpoints += 1
    ended = session.scalars(
        select(JobModel).where(JobModel.status.in_(ENDED), JobModel.finished_at <= before,
                               JobModel.held_out.is_not(None)).limit(BATCH).with_for_update()).all()
    ended = [job for job in ended if job.held_out and not job.held_out.get("deleted")]
    for job in ended:
        job.held_out = {**(job.held_out or {}), "deleted": True}
    session.commit()
    for job in ended:
        held_out.delete(store, job.id)
        collected.held_out += 1


def _referenced(session: Session, folder: str, keys: list[str]) -> set[str]:
    """Which of these keys (all under `folder`) a row still refers to."""
    if folder == "files":
        ids = {k.removeprefix("files/"): k for k in keys}
        live = session.scalars(select(FileModel.id).where(FileModel.id.in_(ids), FileModel.deleted_at.is_(None)))
        return {ids[i] for i in live}
    if folder == "checkpoints":
        ids = {k.removeprefix("checkpoints/"): k for k in keys}
        kept = session.scalars(select(JobCheckpointModel.id).where(
            JobCheckpointModel.id.in_(ids), JobCheckpointModel.blob_sha256.is_not(None)))
        return {ids[i] for i in kept}
    if folder in ("exports", "batches"):  # exports/<lease>/..., batches/<lease>/...: kept while the lease lives
        leases = {k.split("/")[1]: k for k in keys}
        live = session.scalars(select(LeaseModel.id).where(LeaseModel.id.in_(leases), LeaseModel.status.in_(LIVE_LEASE)))
        by_lease = set(live)
        return {k for k in keys if k.split("/")[1] in by_lease}
    if folder == "jobs":  # jobs/<id>/initial: the adapter a job starts from, kept until the job ends
        jobs = {k.split("/")[1] for k in keys}
        open_jobs = set(session.scalars(select(JobModel.id).where(JobModel.id.in_(jobs), JobModel.status.not_in(ENDED))))
        return {k for k in keys if k.split("/")[1] in open_jobs}
    return set(session.scalars(select(LeaseModel.adapter_key).where(LeaseModel.adapter_key.in_(keys))))


def _remove_orphans(session: Session, store: BlobStore, collected: Collected) -> None:
    old_enough = time.time() - ORPHAN_GRACE_S
    for folder in ("files", "checkpoints", "adapters", "exports", "batches", "jobs", STAGING):
        candidates = [(key, incoming) for key, modified, incoming in store.stored(folder) if modified < old_enough
                      and (folder != "jobs" or key.endswith("/initial"))]  # jobs/ scratch: `_drop_scratch`
        for start in range(0, len(candidates), BATCH):
            chunk = candidates[start:start + BATCH]
            kept = _referenced(session, folder, [key for key, incoming in chunk if not incoming])
            session.commit()
            for key, incoming in chunk:
                if incoming or key not in kept:
                    store.remove_stored(key)
                    collected.orphans += 1
                    collected.keys.append(key)


def _close_lapsed_tickets(session: Session, store: BlobStore, collected: Collected) -> None:
    """What lapsed tickets' URLs may have written (a second PUT after an adoption too): deleted now, not an
    hour after it was written."""
    while keys := uploads.lapsed_tickets(session=session, limit=BATCH):
        session.commit()
        for key in keys:
            store.delete(key)
            collected.orphans += 1
            collected.keys.append(key)
        if len(keys) < BATCH:
            break


def collect(*, session: Session, store: BlobStore, settings: CoordinatorSettings) -> Collected:
    collected = Collected()
    _close_lapsed_tickets(session, store, collected)
    _expire_files(session, store, collected)
    _drop_scratch(session, store, settings, collected)
    _remove_orphans(session, store, collected)
    collected.orphans += store.abandoned_uploads(older_than_s=ABANDONED_UPLOAD_GRACE_S)
    return collected

"""Files: upload with line-by-line dataset validation, read, list, content, delete."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import timedelta
from pathlib import PurePath
from typing import BinaryIO, Literal

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from coordinator.db.ids import new_id
from coordinator.db.tables import AccountModel, FileModel, FileStatus, JobModel, JobStatus, utcnow
from coordinator.services.paging import Order, page
from coordinator.storage import BlobStore, StoredBlob
from shared.batches import validate_batch_file
from shared.datasets import DatasetSummary, validate_dataset
from shared.errors import Conflict, InvalidRequest, NotFound

UPLOAD_PURPOSES = ("fine-tune", "batch")
Lock = Literal["share", "update"] | None
_LOCKS: dict[Lock, dict[str, bool] | None] = {None: None, "share": {"read": True}, "update": {"read": False}}
TERMINAL = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


def blob_key(file_id: str) -> str:
    return f"files/{file_id}"


def commit_made(session: Session, store: BlobStore, made: list[str]) -> None:
    """Commit the rows of files whose blobs `made` were just stored; if the commit fails, the blobs go too (a
    committed file always has its bytes, and no blob outlives a row that never was)."""
    try:
        session.commit()
    except BaseException:
        for key in made:
            store.delete(key)
        raise


def _clean_filename(filename: str | None) -> str:
    name = PurePath((filename or "").replace("\\", "/")).name.strip()
    if not name:
        raise InvalidRequest("The uploaded file has no filename.", param="file")
    if name in (".", "..") or any(unicodedata.category(c) == "Cc" for c in name):
        raise InvalidRequest("The filename is not usable (control characters or a bare dot).", param="file")
    if len(name) > 255:
        raise InvalidRequest("The filename is longer than 255 characters.", param="file")
    return name


MAX_LINE_BYTES = 8 * 1024 * 1024  # one example; a longer line is refused before it is held whole


@dataclass(frozen=True, slots=True)
class CheckedDataset:
    """A dataset stored and validated (no database work): what `record` makes a file of."""

    file_id: str
    blob: StoredBlob
    summary: DatasetSummary
    model: str | None = None  # a batch file's model


def check_upload(*, store: BlobStore, purpose: str, source: BinaryIO, max_bytes: int, min_examples: int) -> CheckedDataset:
    """Stream the upload into storage and validate it line by line (bounded lines, bounded memory), outside any
    database session; a bad file is rejected with its first bad line and nothing is kept."""
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(
            f"Invalid purpose {purpose!r}: tunegrid accepts files with purpose 'fine-tune' or 'batch'.",
            param="purpose")
    file_id = new_id("file-")
    blob = store.put(blob_key(file_id), source, max_bytes=max_bytes)
    try:
        lines = store.iter_lines(blob.key, max_line=MAX_LINE_BYTES)
        if purpose == "batch":
            batch = validate_batch_file(lines)
            return CheckedDataset(file_id=file_id, blob=blob, model=batch.model, summary=DatasetSummary(
                format="batch", examples=batch.requests, estimated_tokens=batch.estimated_tokens))  # type: ignore[arg-type]
        summary = validate_dataset(lines, min_examples=min_examples)
    except BaseException:
        store.delete(blob.key)
        raise
    return CheckedDataset(file_id=file_id, blob=blob, summary=summary)


def record(
    *, session: Session, store: BlobStore, account: AccountModel, checked: CheckedDataset, filename: str | None,
    purpose: str, retention: timedelta,
) -> FileModel:
    """The file row for a checked upload; if it cannot be recorded, its content goes too."""
    try:
        now = utcnow()
        summary = checked.summary
        file = FileModel(
            id=checked.file_id, account_id=account.id, filename=_clean_filename(filename), purpose=purpose,
            bytes=checked.blob.bytes, sha256=checked.blob.sha256, status=FileStatus.processed, format=summary.format,
            examples=summary.examples, estimated_tokens=summary.estimated_tokens, uses_tools=summary.uses_tools,
            model=checked.model,
            created_at=now,
            expires_at=now + retention,
        )
        session.add(file)
        session.commit()
    except BaseException:
        store.delete(checked.blob.key)
        raise
    return file


def upload(
    *, session: Session, store: BlobStore, account: AccountModel, filename: str | None, purpose: str,
    source: BinaryIO, max_bytes: int, min_examples: int, retention: timedelta,
) -> FileModel:
    """`check_upload` then `record`, in one call (for the CLI and tests; the API keeps the check out of its session)."""
    checked = check_upload(store=store, purpose=purpose, source=source, max_bytes=max_bytes, min_examples=min_examples)
    return record(session=session, store=store, account=account, checked=checked, filename=filename, purpose=purpose,
                  retention=retention)


def get(*, session: Session, account: AccountModel, file_id: str, lock: Lock = None) -> FileModel:
    """The caller's live file; someone else's, a deleted or an expired one is the same 404 as a missing one.

    `lock` (PostgreSQL): jobs being created on the file take "share", its deletion takes "update", so the two
    cannot interleave while any number of jobs can be created from one file at once.
    """
    file = session.get(FileModel, file_id, with_for_update=_LOCKS[lock])
    if (file is None or file.account_id != account.id or file.deleted_at is not None
            or (file.expires_at is not None and file.expires_at <= utcnow())):
        raise NotFound(f"No such File object: {file_id}", param="file_id")
    return file


def list_files(
    *, session: Session, account: AccountModel, after: str | None, limit: int, order: Order, purpose: str | None,
) -> tuple[list[FileModel], bool]:
    stmt = select(FileModel).where(
        FileModel.account_id == account.id, FileModel.deleted_at.is_(None),
        or_(FileModel.expires_at.is_(None), FileModel.expires_at > utcnow()),
    )
    if purpose is not None:
        stmt = stmt.where(FileModel.purpose == purpose)
    return page(session=session, stmt=stmt, id_column=FileModel.id, after=after, limit=limit, order=order)


def delete(*, session: Session, store: BlobStore, account: AccountModel, file_id: str) -> FileModel:
    file = get(session=session, account=account, file_id=file_id, lock="update")
    in_use = session.scalars(
        select(JobModel.id)
        .where(JobModel.account_id == account.id, JobModel.status.not_in(TERMINAL))
        .where(or_(JobModel.training_file_id == file_id, JobModel.validation_file_id == file_id))
        .limit(1)
    ).first()
    if in_use:
        raise Conflict(f"File {file_id} is used by fine-tuning job {in_use}; cancel the job or wait for it to finish.",
                       param="file_id", code="file_in_use")
    # The row stays (jobs refer to it by id); the content goes.
    file.deleted_at = utcnow()
    session.commit()
    store.delete(blob_key(file.id))
    return file

"""An export lease, the worker's side: it uploads each format its export asks for, then completes. Every upload is
checked (`export_checks.py`: members, headers, tensors, sizes, sha256) outside any row lock; the export then
succeeds with them as the customer's files, beside an Ollama Modelfile the coordinator writes for each GGUF file.

An upload that fails its checks fails the lease as a failed check against its worker (not billed, an attempt
used), and the export is placed again elsewhere; the worker's own figures (seconds per format) are display only.
"""

from __future__ import annotations

import hashlib
import io
import logging
from typing import Any

from sqlalchemy.orm import Session

from coordinator.db.ids import new_id
from coordinator.db.tables import (
    FileModel, FileStatus, JobModel, JobStatus, LeaseKind, LeaseStatus, WorkerModel, utcnow,
)
from coordinator.services import export_checks, files
from coordinator.services.fencing import FencedLease, already_ended, fenced
from coordinator.services.job_states import change_status, record_event
from coordinator.services.lease_states import end_lease, fail_check
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore, StoredBlob
from shared import modelfile
from shared.catalog import get_base_model
from shared.digests import sha256_file
from shared.errors import Conflict, InvalidRequest
from shared.protocol import LeaseComplete

log = logging.getLogger(__name__)
FILE_FORMATS = {"merged": "merged-safetensors", "gguf": "gguf", "modelfile": "ollama-modelfile"}


def _export_lease(f: FencedLease, fmt: str | None = None) -> list[str]:
    if f.lease.kind != LeaseKind.export:
        raise Conflict(f"A {f.lease.kind} lease does not upload exports.", code="wrong_lease_kind")
    formats = list((f.job.export or {}).get("formats") or ())
    if fmt is not None and fmt not in formats:
        raise InvalidRequest(f"This export asks for {', '.join(formats)}, not {fmt}.", param="format",
                             code="format_not_asked")
    return formats


def upload_limit(*, session: Session, worker: WorkerModel, lease_id: str, fencing_token: int, fmt: str) -> int:
    """Before accepting an upload: the lease is a live export lease asking for `fmt`; the most bytes it may take."""
    f = fenced(session=session, worker=worker, lease_id=lease_id, fencing_token=fencing_token)
    _export_lease(f, fmt)
    limit = export_checks.upload_limit(get_base_model(f.job.model), fmt)
    session.commit()
    return limit


def upload_key(lease_id: str) -> str:
    """Each upload its own blob, so a second upload never swaps bytes under a completion being checked."""
    return f"exports/{lease_id}/{new_id('upload-')}"


def _uploads(lease_result: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return dict((lease_result or {}).get("uploads") or {})


def record_upload(*, session: Session, store: BlobStore, worker: WorkerModel, lease_id: str, fencing_token: int,
                  fmt: str, blob: StoredBlob) -> None:
    try:
        f = fenced(session=session, worker=worker, lease_id=lease_id, fencing_token=fencing_token)
        _export_lease(f, fmt)
        uploads = _uploads(f.lease.result)
        previous = uploads.get(fmt, {}).get("key")
        uploads[fmt] = {"key": blob.key, "sha256": blob.sha256, "bytes": blob.bytes}
        f.lease.result = {**(f.lease.result or {}), "uploads": uploads}
        session.commit()
    except BaseException:
        store.delete(blob.key)
        raise
    if previous and previous != blob.key:
        store.delete(previous)


def _check(store: BlobStore, model: str, uploads: dict[str, dict[str, Any]]) -> str | None:
    """None when every upload is the export it claims to be; otherwise why not."""
    base = get_base_model(model)
    for fmt, upload in uploads.items():
        try:
            with store.local(upload["key"]) as path:
                if sha256_file(path) != upload["sha256"]:
                    return f"{fmt}: the stored upload no longer matches its sha256"
                if fmt == "merged":
                    export_checks.check_merged(path, base)
                else:
                    export_checks.check_gguf(path, base, fmt)
        except export_checks.ExportRejected as exc:
            return f"{fmt}: {exc}"
        except OSError as exc:
            return f"{fmt}: the upload could not be read ({exc.__class__.__name__})"
    return None


def _filename(export: JobModel, fmt: str) -> str:
    return f"{export.id}-merged.tar" if fmt == "merged" else f"{export.id}-{fmt.removeprefix('gguf:')}.gguf"


def _deliver(session: Session, store: BlobStore, export: JobModel, uploads: dict[str, dict[str, Any]],
             formats: list[str]) -> list[str]:
    """The checked uploads as the customer's files, and a Modelfile for each GGUF file; the blob names made."""
    base = get_base_model(export.model)
    made: list[str] = []
    listed: list[dict[str, Any]] = []

    def add(fmt: str, filename: str, blob_bytes: int, sha256: str, kind: str) -> FileModel:
        file = FileModel(id=new_id("file-"), account_id=export.account_id, filename=filename,
                         purpose="fine-tune-results", bytes=blob_bytes, sha256=sha256, status=FileStatus.processed,
                         format=FILE_FORMATS[kind], created_at=utcnow())
        session.add(file)
        listed.append({"format": fmt, "file_id": file.id, "filename": filename, "bytes": blob_bytes})
        return file

    for fmt in formats:
        upload = uploads[fmt]
        filename = _filename(export, fmt)
        file = add(fmt, filename, upload["bytes"], upload["sha256"], "merged" if fmt == "merged" else "gguf")
        store.copy(upload["key"], files.blob_key(file.id))
        made.append(files.blob_key(file.id))
        if fmt != "merged" and modelfile.offered(base):
            text = modelfile.render(base, gguf_name=filename,
                                    model_name=(export.export or {}).get("model", export.id)).encode()
            ollama = add(f"modelfile:{fmt}", f"{export.id}-{fmt.removeprefix('gguf:')}.Modelfile", len(text),
                         hashlib.sha256(text).hexdigest(), "modelfile")
            store.put(files.blob_key(ollama.id), io.BytesIO(text))
            made.append(files.blob_key(ollama.id))
    export.result_files = [entry["file_id"] for entry in listed]
    export.export = {**(export.export or {}), "files": listed}
    return made


def complete(*, session: Session, store: BlobStore, settings: CoordinatorSettings, worker: WorkerModel,
             lease_id: str, fencing_token: int, report: LeaseComplete) -> FencedLease:
    f = fenced(session=session, worker=worker, lease_id=lease_id, fencing_token=fencing_token, allow_ended=True)
    if already_ended(f, LeaseStatus.completed):
        session.commit()
        return f
    formats = _export_lease(f)
    uploads = _uploads(f.lease.result)
    missing = [fmt for fmt in formats if fmt not in uploads]
    if missing:
        raise Conflict(f"Upload {', '.join(missing)} (PUT .../exports/FORMAT) before reporting completion.",
                       code="export_missing")
    model = f.job.model
    session.commit()  # no row stays locked while gigabytes are read
    rejected = _check(store, model, {fmt: uploads[fmt] for fmt in formats})
    f = fenced(session=session, worker=worker, lease_id=lease_id, fencing_token=fencing_token, allow_ended=True)
    if already_ended(f, LeaseStatus.completed):
        session.commit()
        return f
    if _uploads(f.lease.result) != uploads:
        raise Conflict("An export was uploaded again while the completion was checked; report completion again.",
                       code="export_replaced")
    usage = report.usage.model_dump()
    if rejected is not None:
        fail_check(session=session, settings=settings, lease=f.lease, job=f.job, worker=f.worker,
                   reason=f"Export rejected: {rejected}", usage=usage)
        for upload in uploads.values():
            store.delete(upload["key"])
        return f
    end_lease(session=session, lease=f.lease, job=f.job, worker=f.worker, status=LeaseStatus.completed,
              reason="completed; exports checked", usage=usage)
    made = _deliver(session, store, f.job, uploads, formats)
    names = ", ".join(f"{e['format']} ({e['file_id']})" for e in f.job.export["files"])
    change_status(session=session, job=f.job, to=JobStatus.succeeded, message=f"Export completed: {names}",
                  data={"lease_id": f.lease.id, "files": f.job.result_files})
    parent = session.get(JobModel, f.job.parent_job_id) if f.job.parent_job_id else None
    if parent is not None:
        record_event(session=session, job=parent, message=f"Export {f.job.id} completed: {names}",
                     data={"export_id": f.job.id, "files": f.job.result_files})
    files.commit_made(session, store, made)
    for upload in uploads.values():
        store.delete(upload["key"])
    return f

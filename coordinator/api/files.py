"""`/v1/files`: upload, list, retrieve, download and delete files (OpenAI's Files API)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, BinaryIO, Literal
from urllib.parse import quote

import anyio.to_thread
from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response, StreamingResponse

from coordinator.api.deps import CustomerCaller, SettingsDep, StoreDep, reject_unknown_query
from coordinator.api.downloads import blob_response, chunks
from coordinator.api.errors import ERROR_RESPONSES
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, FileModel
from coordinator.services import files
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from shared.errors import InvalidRequest, NotFound
from shared.schemas.files import FileDeleted, FileList, FileRead

router = APIRouter(prefix="/v1/files", tags=["files"], responses=ERROR_RESPONSES,
                   dependencies=[reject_unknown_query()])

MIN_EXPIRY_S, MAX_EXPIRY_S = 3600, 30 * 86400


def file_read(file: FileModel) -> FileRead:
    return FileRead(
        id=file.id, bytes=file.bytes, created_at=int(file.created_at.timestamp()),
        expires_at=int(file.expires_at.timestamp()) if file.expires_at else None, filename=file.filename,
        purpose=file.purpose, status=file.status.value, status_details=file.status_details,  # type: ignore[arg-type]
        format=file.format, uses_tools=file.uses_tools, examples=file.examples,  # type: ignore[arg-type]
        estimated_tokens=file.estimated_tokens, model=file.model,
        sha256=file.sha256,
    )


@router.post("", response_model=FileRead, response_model_exclude_none=True)
async def upload_file(
    caller: CustomerCaller, store: StoreDep, settings: SettingsDep,
    file: Annotated[UploadFile, File(description="JSONL training data")],
    purpose: Annotated[Literal["fine-tune", "batch"], Form(description="'fine-tune' (training data) or 'batch' "
                                                                        "(Batch API requests)")],
    expires_after_anchor: Annotated[str | None, Form(alias="expires_after[anchor]", max_length=32)] = None,
    expires_after_seconds: Annotated[int | None, Form(alias="expires_after[seconds]")] = None,
) -> FileRead:
    retention = timedelta(days=settings.file_retention_days)
    if expires_after_anchor is not None or expires_after_seconds is not None:
        if expires_after_anchor != "created_at":
            raise InvalidRequest("expires_after[anchor] must be 'created_at'.", param="expires_after.anchor")
        if expires_after_seconds is None or not MIN_EXPIRY_S <= expires_after_seconds <= MAX_EXPIRY_S:
            raise InvalidRequest(f"expires_after[seconds] must be between {MIN_EXPIRY_S} and {MAX_EXPIRY_S}.",
                                 param="expires_after.seconds")
        retention = timedelta(seconds=expires_after_seconds)
    await caller.verify()  # (already checked before the body was read: api/limits.py) the error order stays
    checked = await anyio.to_thread.run_sync(lambda: files.check_upload(
        store=store, purpose=purpose, source=file.file, max_bytes=settings.max_upload_bytes,
        min_examples=settings.min_training_examples))  # streaming and validating hold no database connection
    created = await caller.run(files.record, store=store, checked=checked, filename=file.filename, purpose=purpose,
                               retention=retention)
    return file_read(created)


@router.get("", response_model=FileList, response_model_exclude_none=True)
async def list_files(
    caller: CustomerCaller,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
    purpose: Annotated[str | None, Query(max_length=64)] = None,
) -> FileList:
    rows, has_more = await caller.run(files.list_files, after=after, limit=limit, order=order, purpose=purpose)
    return FileList(
        data=[file_read(f) for f in rows], has_more=has_more,
        first_id=rows[0].id if rows else "", last_id=rows[-1].id if rows else "",
    )


@router.get("/{file_id}", response_model=FileRead, response_model_exclude_none=True)
async def retrieve_file(file_id: str, caller: CustomerCaller) -> FileRead:
    return file_read(await caller.run(files.get, file_id=file_id))


@router.get("/{file_id}/content", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "The file's bytes"},
                       307: {"description": "With an object store: a presigned URL for the file, valid for a while"}})
async def download_file(file_id: str, caller: CustomerCaller, store: StoreDep, settings: SettingsDep) -> Response:
    """The bytes, or (object store, `storage_redirect_downloads`) a 307 to a presigned URL the client follows."""
    file, handle = await caller.run(_open_content, store=store, file_id=file_id, relay=not _redirects(store, settings))
    disposition = {"Content-Disposition": f"attachment; filename*=utf-8''{quote(file.filename)}"}
    if handle is None:
        return blob_response(store, files.blob_key(file.id), media_type="application/octet-stream", headers={},
                             expires_s=DOWNLOAD_URL_S, filename=file.filename)
    return StreamingResponse(chunks(handle), media_type="application/octet-stream",
                             headers={"Content-Length": str(file.bytes), **disposition})


DOWNLOAD_URL_S = 3600  # a presigned download link stays valid this long


def _redirects(store: BlobStore, settings: CoordinatorSettings) -> bool:
    return store.direct and settings.storage_redirect_downloads


def _open_content(*, session: Session, account: AccountModel, store: BlobStore, file_id: str, relay: bool,
                  ) -> tuple[FileModel, BinaryIO | None]:
    file = files.get(session=session, account=account, file_id=file_id)
    if not relay:
        if store.size(files.blob_key(file.id)) is None:
            raise NotFound(f"No such File object: {file_id}", param="file_id")
        return file, None
    try:
        # Open before answering: a delete racing this request then still streams the whole file.
        return file, store.open(files.blob_key(file.id))
    except FileNotFoundError:
        raise NotFound(f"No such File object: {file_id}", param="file_id") from None


@router.delete("/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str, caller: CustomerCaller, store: StoreDep) -> FileDeleted:
    deleted = await caller.run(files.delete, store=store, file_id=file_id)
    return FileDeleted(id=deleted.id, deleted=True)

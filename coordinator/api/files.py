"""`/v1/files`: upload, list, retrieve, download and delete files (OpenAI's Files API)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse

from coordinator.api.deps import reject_unknown_query, CurrentCustomer, SessionDep, SettingsDep, StoreDep
from coordinator.api.errors import ERROR_RESPONSES
from coordinator.db.models import FileModel
from coordinator.services import files
from shared.errors import InvalidRequest
from shared.schemas.files import FileDeleted, FileList, FileRead

router = APIRouter(prefix="/v1/files", tags=["files"], responses=ERROR_RESPONSES,
                   dependencies=[reject_unknown_query()])

MIN_EXPIRY_S, MAX_EXPIRY_S = 3600, 30 * 86400


def file_read(file: FileModel) -> FileRead:
    return FileRead(
        id=file.id, bytes=file.bytes, created_at=int(file.created_at.timestamp()),
        expires_at=int(file.expires_at.timestamp()) if file.expires_at else None, filename=file.filename,
        purpose=file.purpose, status=file.status.value, status_details=file.status_details,  # type: ignore[arg-type]
        format=file.format, examples=file.examples, estimated_tokens=file.estimated_tokens,  # type: ignore[arg-type]
        sha256=file.sha256,
    )


@router.post("", response_model=FileRead, response_model_exclude_none=True)
def upload_file(
    account: CurrentCustomer, session: SessionDep, store: StoreDep, settings: SettingsDep,
    file: Annotated[UploadFile, File(description="JSONL training data")],
    purpose: Annotated[Literal["fine-tune"], Form(description="Only 'fine-tune' is accepted")],
    expires_after_anchor: Annotated[str | None, Form(alias="expires_after[anchor]", max_length=32)] = None,
    expires_after_seconds: Annotated[int | None, Form(alias="expires_after[seconds]")] = None,
) -> FileRead:
    retention_days = settings.file_retention_days
    if expires_after_anchor is not None or expires_after_seconds is not None:
        if expires_after_anchor != "created_at":
            raise InvalidRequest("expires_after[anchor] must be 'created_at'.", param="expires_after.anchor")
        if expires_after_seconds is None or not MIN_EXPIRY_S <= expires_after_seconds <= MAX_EXPIRY_S:
            raise InvalidRequest(f"expires_after[seconds] must be between {MIN_EXPIRY_S} and {MAX_EXPIRY_S}.",
                                 param="expires_after.seconds")
        retention_days = max(1, expires_after_seconds // 86400)
    created = files.upload(
        session=session, store=store, account=account, filename=file.filename, purpose=purpose, source=file.file,
        max_bytes=settings.max_upload_bytes, min_examples=settings.min_training_examples,
        retention_days=retention_days,
    )
    return file_read(created)


@router.get("", response_model=FileList, response_model_exclude_none=True)
def list_files(
    account: CurrentCustomer, session: SessionDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
    purpose: Annotated[str | None, Query(max_length=64)] = None,
) -> FileList:
    rows, has_more = files.list_files(session=session, account=account, after=after, limit=limit, order=order,
                                      purpose=purpose)
    return FileList(
        data=[file_read(f) for f in rows], has_more=has_more,
        first_id=rows[0].id if rows else "", last_id=rows[-1].id if rows else "",
    )


@router.get("/{file_id}", response_model=FileRead, response_model_exclude_none=True)
def retrieve_file(file_id: str, account: CurrentCustomer, session: SessionDep) -> FileRead:
    return file_read(files.get(session=session, account=account, file_id=file_id))


@router.get("/{file_id}/content", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "The file's bytes"}})
def download_file(file_id: str, account: CurrentCustomer, session: SessionDep, store: StoreDep) -> FileResponse:
    file = files.get(session=session, account=account, file_id=file_id)
    return FileResponse(store.path(files.blob_key(file.id)), media_type="application/octet-stream",
                        filename=file.filename)


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, account: CurrentCustomer, session: SessionDep, store: StoreDep) -> FileDeleted:
    deleted = files.delete(session=session, store=store, account=account, file_id=file_id)
    return FileDeleted(id=deleted.id, deleted=True)

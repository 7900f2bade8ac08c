"""`/v1/workers/leases/{lease_id}`: what the agent holding a lease does with it: report events, fetch its
datasets and resume checkpoint, upload checkpoints and the adapter, and finish (complete, fail, preempted).
Every call presents the lease's fencing token (`FencingToken`); a stale one is `409 lease_lost`."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import FileResponse, Response

from coordinator.api.deps import CurrentWorker, SettingsDep, StoreDep
from coordinator.api.downloads import blob_response
from coordinator.api.errors import ERROR_RESPONSES
from coordinator.db.ids import new_id
from coordinator.services import batch_leases, checkpoints, export_leases, leases, uploads
from coordinator.services.fencing import FencedLease, parse_fencing_token
from coordinator.settings import CoordinatorSettings
from coordinator.storage import STAGING, BlobStore, StoredBlob, staging_prefix
from shared.checkpoint import CheckpointRules
from shared.errors import InvalidRequest, NotFound, PayloadTooLarge
from shared.protocol import (
    FENCING_TOKEN_HEADER, SHA256_HEADER, UPLOAD_KEY_HEADER, BatchPartReply, LeaseComplete, LeaseEvents, LeaseFail,
    LeasePreempted, LeaseReply, UploadReply, UploadTicket, UploadTicketRequest,
)
from shared.schemas.common import ErrorResponse

router = APIRouter(prefix="/v1/workers/leases", tags=["workers"], responses=ERROR_RESPONSES)
LeaseId = Annotated[str, Path(max_length=64)]


async def fencing_token(value: Annotated[str | None, Header(alias=FENCING_TOKEN_HEADER)] = None) -> int:
    """The lease's fencing token, from its header (400 `missing_fencing_token` when absent or malformed)."""
    return parse_fencing_token(value)


FencingToken = Annotated[int, Depends(fencing_token)]


def lease_reply(f: FencedLease, message: str = "") -> LeaseReply:
    return LeaseReply(lease_id=f.lease.id, fencing_token=f.lease.fencing_token, status=f.lease.status.value,
                      job_status=f.job.status.value, message=message or (f.lease.end_reason or ""))


@router.post("/{lease_id}/events", response_model=LeaseReply)
async def lease_events(lease_id: LeaseId, body: LeaseEvents, worker: CurrentWorker, token: FencingToken) -> LeaseReply:
    return lease_reply(await worker.run(leases.record_events, lease_id=lease_id, fencing_token=token, events=body.events))


@router.get("/{lease_id}/files/{which}", response_class=FileResponse,
            responses={307: {"description": "With an object store: a presigned URL for this one object"}})
async def lease_file(lease_id: LeaseId,
                     which: Annotated[str, Path(pattern="^(training|validation|held_out|adapter|initial|batch_done)$")],
                     worker: CurrentWorker, token: FencingToken, store: StoreDep, settings: SettingsDep) -> Response:
    """The lease's inputs; only for the worker holding the live lease, so the URL dies with the lease (a presigned
    one within `lease_grace_s`). The held-out sample and the adapter under test go to verification leases only."""
    found = await worker.run(leases.lease_input, lease_id=lease_id, fencing_token=token, which=which)
    media = "application/gzip" if which in ("adapter", "initial") else "application/jsonl"
    return _blob(store, settings, found.key, media, found.sha256)


@router.get("/{lease_id}/checkpoints/{checkpoint_id}/content", response_class=FileResponse,
            responses={307: {"description": "With an object store: a presigned URL for this one object"}})
async def lease_resume_checkpoint(lease_id: LeaseId, checkpoint_id: Annotated[str, Path(max_length=64)],
                                  worker: CurrentWorker, token: FencingToken, store: StoreDep,
                                  settings: SettingsDep) -> Response:
    checkpoint = await worker.run(checkpoints.resume_content, lease_id=lease_id, fencing_token=token,
                                  checkpoint_id=checkpoint_id)
    return _blob(store, settings, checkpoints.checkpoint_key(checkpoint.id), "application/gzip",
                 checkpoint.blob_sha256 or "")


def _blob(store: BlobStore, settings: CoordinatorSettings, key: str, media: str, sha256: str) -> Response:
    try:
        return blob_response(store, key, media_type=media, headers={SHA256_HEADER: sha256},
                             expires_s=settings.lease_grace_s)
    except FileNotFoundError:
        raise NotFound("That input is missing from storage.", code="blob_missing") from None


def _declared_sha256(value: str | None) -> str:
    if value is None or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise InvalidRequest(f"Send the upload's sha256 (64 lowercase hex digits) in the {SHA256_HEADER} header.",
                             param=SHA256_HEADER, code="missing_sha256")
    return value


StagedKey = Annotated[str | None, Header(alias=UPLOAD_KEY_HEADER, max_length=200)]
Sha256 = Annotated[str | None, Header(alias=SHA256_HEADER)]


async def _limit(worker: CurrentWorker, settings: CoordinatorSettings, lease_id: str, token: int, kind: str,
                 fmt: str | None = None) -> int:
    """The most bytes this lease's upload of `kind` may have (the live lease's own: a stale token is refused)."""
    if kind == "checkpoint":
        rules = await worker.run(checkpoints.upload_rules, settings=settings, lease_id=lease_id, fencing_token=token)
        return _checkpoint_limit(settings, rules)
    if kind == "adapter":
        limit = await worker.run(leases.adapter_upload_limit, lease_id=lease_id, fencing_token=token)
        return min(settings.max_adapter_bytes, limit + limit // 1000 + 64 * 1024)
    if kind == "export":
        if fmt is None:
            raise InvalidRequest("An export upload names its format.", param="format")
        limit = await worker.run(export_leases.upload_limit, lease_id=lease_id, fencing_token=token, fmt=fmt)
        return min(settings.max_export_bytes, limit)
    return int(await worker.run(batch_leases.part_limit, lease_id=lease_id, fencing_token=token))


def _checkpoint_limit(settings: CoordinatorSettings, rules: CheckpointRules) -> int:
    return min(settings.max_adapter_bytes, rules.upload_limit())


async def _receive(request: Request, store: BlobStore, key: str, *, lease_id: str, kind: str, limit: int,
                   expected: str, staged: str | None) -> StoredBlob:
    """The upload as a stored blob under `key`: the request's body, or (`staged`) the object the worker PUT to
    its presigned URL, checked for size and sha256 and moved under `key` without passing through here."""
    if staged is None:
        return await store.put_stream(key, request.stream(), max_bytes=limit, expected_sha256=expected)
    if not store.direct or not staged.startswith(f"{staging_prefix(lease_id)}{kind}-") or not _STAGED.fullmatch(staged):
        raise InvalidRequest(f"{UPLOAD_KEY_HEADER} names no upload of this lease's {kind}.", param=UPLOAD_KEY_HEADER,
                             code="invalid_upload_key")
    return await anyio.to_thread.run_sync(
        lambda: store.adopt(staged, key, max_bytes=limit, expected_sha256=expected))


_STAGED = re.compile(rf"{STAGING}/[A-Za-z0-9_-]+/[a-z]+-[A-Za-z0-9_-]+")  # fullmatch


@router.post("/{lease_id}/uploads", response_model=UploadTicket)
async def upload_ticket(lease_id: LeaseId, body: UploadTicketRequest, worker: CurrentWorker, token: FencingToken,
                        store: StoreDep, settings: SettingsDep) -> UploadTicket:
    """A presigned URL for one upload of this lease (an object store only; otherwise no `url`: send the bytes to
    the upload call itself). It takes exactly the declared size, and a PUT must start within two minutes (at most
    `lease_grace_s`). Each stays open, counted against what the lease may park in the store, until it lapses
    (`services/uploads.py`)."""
    limit = await _limit(worker, settings, lease_id, token, body.kind, body.format)
    if body.bytes > limit:
        raise PayloadTooLarge(f"The upload is larger than the limit of {limit} bytes.")
    key = f"{staging_prefix(lease_id)}{body.kind}-{new_id('up-')}"
    ticket = store.presigned_put(key, expires_s=min(settings.lease_grace_s, uploads.UPLOAD_URL_S), length=body.bytes,
                                 sha256=body.sha256)
    if ticket is None:
        return UploadTicket()
    lapsed = await worker.run(uploads.open_ticket, lease_id=lease_id, key=key, size=body.bytes, limit=limit,
                              expires_at=datetime.fromtimestamp(ticket.expires_at, UTC))
    for stale in lapsed:  # what an expired ticket of this lease may have written
        await anyio.to_thread.run_sync(store.delete, stale)
    return UploadTicket(url=ticket.url, headers=ticket.headers, key=ticket.key, expires_at=ticket.expires_at)


@router.put("/{lease_id}/checkpoints", response_model=UploadReply,
            responses={422: {"model": ErrorResponse, "description": "The checkpoint failed its checks"}})
async def upload_checkpoint(
    request: Request, lease_id: LeaseId, step: Annotated[int, Query(ge=0, le=10**9)], worker: CurrentWorker,
    token: FencingToken, store: StoreDep, settings: SettingsDep, sha256: Sha256 = None, staged: StagedKey = None,
) -> UploadReply:
    """A checkpoint archive: streamed to storage (or adopted from a direct upload) and sha256-checked, then checked
    against the job (shared/checkpoint.py) outside any database session, and recorded only if it passes and the
    lease is still live. A refused checkpoint is deleted and counts against the worker (422 `checkpoint_rejected`)."""
    expected = _declared_sha256(sha256)
    rules = await worker.run(checkpoints.upload_rules, settings=settings, lease_id=lease_id, fencing_token=token)
    checkpoint_id = new_id("ftckpt-")
    limit = _checkpoint_limit(settings, rules)
    try:
        blob = await _receive(request, store, checkpoints.checkpoint_key(checkpoint_id), lease_id=lease_id,
                              kind="checkpoint", limit=limit, expected=expected, staged=staged)
    except PayloadTooLarge:
        refused = f"the upload is larger than the {limit} bytes a checkpoint of this job can take"
        raise await worker.run(checkpoints.refuse, settings=settings, lease_id=lease_id, step=step,
                               reason=refused) from None
    refused = await anyio.to_thread.run_sync(checkpoints.check_upload, store, blob, rules, step)
    if refused is not None:
        store.delete(blob.key)
        raise await worker.run(checkpoints.refuse, settings=settings, lease_id=lease_id, step=step, reason=refused)
    await worker.run(checkpoints.record, store=store, settings=settings, lease_id=lease_id, fencing_token=token,
                     step=step, checkpoint_id=checkpoint_id, blob=blob)
    return UploadReply(lease_id=lease_id, kind="checkpoint", sha256=blob.sha256, bytes=blob.bytes, step=step)


@router.put("/{lease_id}/adapter", response_model=UploadReply)
async def upload_adapter(
    request: Request, lease_id: LeaseId, worker: CurrentWorker, token: FencingToken, store: StoreDep,
    settings: SettingsDep, sha256: Sha256 = None, staged: StagedKey = None,
) -> UploadReply:
    expected = _declared_sha256(sha256)
    limit = await _limit(worker, settings, lease_id, token, "adapter")
    blob = await _receive(request, store, leases.adapter_upload_key(lease_id), lease_id=lease_id, kind="adapter",
                          limit=limit, expected=expected, staged=staged)
    await worker.run(leases.record_adapter, store=store, lease_id=lease_id, fencing_token=token, blob=blob)
    return UploadReply(lease_id=lease_id, kind="adapter", sha256=blob.sha256, bytes=blob.bytes)


@router.put("/{lease_id}/exports/{fmt}", response_model=UploadReply)
async def upload_export(
    request: Request, lease_id: LeaseId, fmt: Annotated[str, Path(pattern="^(merged|gguf:(f16|q8_0|q4_k_m))$")],
    worker: CurrentWorker, token: FencingToken, store: StoreDep, settings: SettingsDep, sha256: Sha256 = None,
    staged: StagedKey = None,
) -> UploadReply:
    """One format of an export lease (the merged model as a .tar, or a GGUF file), streamed to storage (or adopted
    from a direct upload) and sha256-checked; its content is checked when the lease completes."""
    expected = _declared_sha256(sha256)
    limit = await _limit(worker, settings, lease_id, token, "export", fmt)
    blob = await _receive(request, store, export_leases.upload_key(lease_id), lease_id=lease_id, kind="export",
                          limit=limit, expected=expected, staged=staged)
    await worker.run(export_leases.record_upload, store=store, lease_id=lease_id, fencing_token=token, fmt=fmt,
                     blob=blob)
    return UploadReply(lease_id=lease_id, kind="export", format=fmt, sha256=blob.sha256, bytes=blob.bytes)


@router.put("/{lease_id}/batch_results", response_model=BatchPartReply)
async def upload_batch_part(
    request: Request, lease_id: LeaseId, worker: CurrentWorker, token: FencingToken, store: StoreDep,
    settings: SettingsDep, sha256: Sha256 = None, staged: StagedKey = None,
) -> BatchPartReply:
    """A batch lease's answers so far (JSONL, one answer or error a line): checked whole, then each request's first
    answer recorded (`services/batch_leases.py`)."""
    expected = _declared_sha256(sha256)
    limit = await _limit(worker, settings, lease_id, token, "batch")
    blob = await _receive(request, store, batch_leases.part_key(lease_id), lease_id=lease_id, kind="batch",
                          limit=limit, expected=expected, staged=staged)
    counts = await worker.run(batch_leases.record_part, store=store, settings=settings, lease_id=lease_id,
                              fencing_token=token, blob=blob)
    return BatchPartReply(lease_id=lease_id, **counts)


@router.post("/{lease_id}/complete", response_model=LeaseReply)
async def complete_lease(lease_id: LeaseId, body: LeaseComplete, worker: CurrentWorker, token: FencingToken,
                         store: StoreDep, settings: SettingsDep) -> LeaseReply:
    return lease_reply(await worker.run(leases.complete, store=store, settings=settings, lease_id=lease_id,
                                        fencing_token=token, report=body, told_in_reply=True))


@router.post("/{lease_id}/fail", response_model=LeaseReply)
async def fail_lease(lease_id: LeaseId, body: LeaseFail, worker: CurrentWorker, token: FencingToken,
                     store: StoreDep, settings: SettingsDep) -> LeaseReply:
    if body.kind == "bad_checkpoint":  # a claim about another worker's upload: the coordinator checks it first
        return lease_reply(await worker.run(checkpoints.report_bad, store=store, settings=settings, lease_id=lease_id,
                                            fencing_token=token, report=body, told_in_reply=True))
    return lease_reply(await worker.run(leases.fail, settings=settings, lease_id=lease_id, fencing_token=token,
                                        report=body, told_in_reply=True))


@router.post("/{lease_id}/preempted", response_model=LeaseReply)
async def preempt_lease(lease_id: LeaseId, body: LeasePreempted, worker: CurrentWorker, token: FencingToken,
                        settings: SettingsDep) -> LeaseReply:
    return lease_reply(await worker.run(leases.preempted, settings=settings, lease_id=lease_id, fencing_token=token,
                                        report=body, told_in_reply=True))


"""`/v1/workers`: the worker protocol (register, heartbeat, claim, lease reports and uploads) and a
provider's view of its workers. Shapes live in `shared/protocol.py`."""

from __future__ import annotations

from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import FileResponse

from coordinator.api.deps import CurrentWorker, ProviderCaller, SettingsDep, StoreDep, reject_unknown_query
from coordinator.api.errors import ERROR_RESPONSES
from coordinator.db.ids import new_id
from coordinator.db.tables import WorkerModel, utcnow
from coordinator.services import checkpoints, files, leases, workers
from coordinator.services.leases import FencedLease, parse_fencing_token
from shared.errors import InvalidRequest, PayloadTooLarge
from shared.money import micros_to_usd
from shared.protocol import (
    FENCING_TOKEN_HEADER, PROTOCOL_HEADER, SHA256_HEADER, ClaimReply, ClaimRequest, HeartbeatReply, LeaseComplete, LeaseEvents,
    LeaseFail, LeasePreempted, LeaseReply, UploadReply, WorkerHeartbeat, WorkerRegister, WorkerRegistered, is_supported,
)
from shared.schemas.common import ErrorResponse
from shared.schemas.workers import WorkerList, WorkerRead

router = APIRouter(prefix="/v1/workers", tags=["workers"], responses=ERROR_RESPONSES)
STRICT_QUERY = [reject_unknown_query()]
FencingToken = Annotated[str | None, Header(alias=FENCING_TOKEN_HEADER)]
LeaseId = Annotated[str, Path(max_length=64)]


def worker_read(worker: WorkerModel) -> WorkerRead:
    return WorkerRead(
        id=worker.id, name=worker.name, machine_id=worker.machine_id, state=worker.state.value,
        pause_reason=worker.pause_reason, gpu_class=worker.gpu_class, gpu_name=worker.gpu_name,
        vram_total_bytes=worker.vram_total_bytes, vram_free_bytes=worker.vram_free_bytes,
        compute_capability=worker.compute_capability, gpus=worker.gpus,
        ask_price_per_gpu_hour=micros_to_usd(worker.ask_price_per_gpu_hour), cached_models=worker.cached_models,
        trusted=worker.trusted, reliability=round(worker.reliability, 4), completed_leases=worker.completed_leases,
        lost_leases=worker.lost_leases, failed_checks=worker.failed_checks, agent_version=worker.agent_version,
        created_at=int(worker.created_at.timestamp()),
        last_heartbeat_at=int(worker.last_heartbeat_at.timestamp()) if worker.last_heartbeat_at else None,
        suspended=worker.suspended_at is not None, revoked=worker.revoked_at is not None,
    )


def lease_reply(f: FencedLease, message: str = "") -> LeaseReply:
    return LeaseReply(lease_id=f.lease.id, fencing_token=f.lease.fencing_token, status=f.lease.status.value,
                      job_status=f.job.status.value, message=message or (f.lease.end_reason or ""))


# --- provider side --------------------------------------------------------------------------------

@router.post("/register", response_model=WorkerRegistered, dependencies=STRICT_QUERY)
async def register_worker(request: Request, body: WorkerRegister, caller: ProviderCaller, settings: SettingsDep) -> WorkerRegistered:
    version = request.headers.get(PROTOCOL_HEADER)
    if not is_supported(version):
        raise InvalidRequest(f"Unsupported or missing {PROTOCOL_HEADER} header ({version!r}). Upgrade tunegrid-worker.",
                             param=PROTOCOL_HEADER, code="unsupported_protocol_version")
    worker, token = await caller.run(workers.register, request=body, protocol_version=int(version or 0),
                                     max_workers=settings.max_workers_per_provider)
    return WorkerRegistered(worker_id=worker.id, worker_token=token, heartbeat_interval_s=settings.heartbeat_interval_s,
                            claim_timeout_s=settings.claim_timeout_s)


@router.get("", response_model=WorkerList, dependencies=STRICT_QUERY)
async def list_workers(caller: ProviderCaller, after: Annotated[str | None, Query(max_length=64)] = None,
                       limit: Annotated[int, Query(ge=1, le=100)] = 20) -> WorkerList:
    rows, has_more = await caller.run(workers.list_workers, after=after, limit=limit)
    return WorkerList(data=[worker_read(w) for w in rows], has_more=has_more)


@router.get("/{worker_id}", response_model=WorkerRead, dependencies=STRICT_QUERY)
async def retrieve_worker(worker_id: Annotated[str, Path(max_length=64)], caller: ProviderCaller) -> WorkerRead:
    return worker_read(await caller.run(workers.get_owned, worker_id=worker_id))


@router.post("/{worker_id}/revoke", response_model=WorkerRead, dependencies=STRICT_QUERY)
async def revoke_worker(request: Request, worker_id: Annotated[str, Path(max_length=64)], caller: ProviderCaller,
                        settings: SettingsDep) -> WorkerRead:
    worker = await caller.run(workers.revoke, worker_id=worker_id, settings=settings)
    request.app.state.worker_tokens.clear()  # this process forgets cached tokens at once; others within seconds
    return worker_read(worker)


# --- the agent's side -----------------------------------------------------------------------------

@router.post("/heartbeat", response_model=HeartbeatReply)
async def heartbeat(request: Request, body: WorkerHeartbeat, worker: CurrentWorker, settings: SettingsDep) -> Response:
    """Kept in hot state and written to the database in the next batch (coordinator/heartbeat_flush.py).
    Only a worker whose lease changed (cancel, pause, lost) reads the database, to hear its command."""
    worker_id = await worker.worker_id()
    received_at = utcnow()
    # Stored as parsed (what the schema allows, nothing else the body held), never the raw bytes.
    snapshot = b'{"received_at":%.3f,"heartbeat":%s}' % (received_at.timestamp(), body.model_dump_json().encode())
    if await request.app.state.hot.heartbeat(worker_id, snapshot):
        commands = await worker.run(workers.record_heartbeat, heartbeat=body, received_at=received_at)
        reply = HeartbeatReply(commands=commands, heartbeat_interval_s=settings.heartbeat_interval_s)
        return Response(reply.model_dump_json().encode(), media_type="application/json")
    request.app.state.heartbeats.add(worker_id, body, received_at)
    # The common reply is always the same bytes: skip building and validating a model per heartbeat.
    return Response(request.app.state.quiet_heartbeat_reply, media_type="application/json")


@router.post("/claim", response_model=ClaimReply)
async def claim(request: Request, body: ClaimRequest, worker: CurrentWorker, settings: SettingsDep) -> ClaimReply:
    """Long-poll for an assignment: answers at once with one, else when woken, else empty after `wait_s`."""
    worker_id = await worker.worker_id()
    hot = request.app.state.hot
    wait_s = min(body.wait_s, settings.claim_timeout_s)
    async with hot.waiter(worker_id) as waiter:
        found = await worker.run(leases.claim, settings=settings, request=body)
        if found is not None or wait_s <= 0:
            return ClaimReply(assignment=found)
        if not await waiter.wait(wait_s):
            return ClaimReply(assignment=None)
    return ClaimReply(assignment=await worker.run(leases.pending_assignment, settings=settings))


@router.post("/leases/{lease_id}/events", response_model=LeaseReply)
async def lease_events(lease_id: LeaseId, body: LeaseEvents, worker: CurrentWorker, fencing_token: FencingToken) -> LeaseReply:
    token = parse_fencing_token(fencing_token)
    return lease_reply(await worker.run(leases.record_events, lease_id=lease_id, fencing_token=token, events=body.events))


@router.get("/leases/{lease_id}/files/{which}", response_class=FileResponse)
async def lease_file(lease_id: LeaseId, which: Annotated[str, Path(pattern="^(training|validation)$")],
                     worker: CurrentWorker, fencing_token: FencingToken, store: StoreDep) -> FileResponse:
    """The lease's dataset; only for the worker holding the live lease, so the URL dies with the lease."""
    token = parse_fencing_token(fencing_token)
    file = await worker.run(leases.training_input, lease_id=lease_id, fencing_token=token, which=which)
    return FileResponse(store.path(files.blob_key(file.id)), media_type="application/jsonl",
                        headers={SHA256_HEADER: file.sha256})


@router.get("/leases/{lease_id}/checkpoints/{checkpoint_id}/content", response_class=FileResponse)
async def lease_resume_checkpoint(lease_id: LeaseId, checkpoint_id: Annotated[str, Path(max_length=64)],
                                  worker: CurrentWorker, fencing_token: FencingToken, store: StoreDep) -> FileResponse:
    token = parse_fencing_token(fencing_token)
    checkpoint = await worker.run(checkpoints.resume_content, lease_id=lease_id, fencing_token=token,
                                  checkpoint_id=checkpoint_id)
    return FileResponse(store.path(checkpoints.checkpoint_key(checkpoint.id)), media_type="application/gzip",
                        headers={SHA256_HEADER: checkpoint.blob_sha256 or ""})


def _declared_sha256(value: str | None) -> str:
    if value is None or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise InvalidRequest(f"Send the upload's sha256 (64 lowercase hex digits) in the {SHA256_HEADER} header.",
                             param=SHA256_HEADER, code="missing_sha256")
    return value


@router.put("/leases/{lease_id}/checkpoints", response_model=UploadReply,
            responses={422: {"model": ErrorResponse, "description": "The checkpoint failed its checks"}})
async def upload_checkpoint(
    request: Request, lease_id: LeaseId, step: Annotated[int, Query(ge=0, le=10**9)], worker: CurrentWorker,
    fencing_token: FencingToken, store: StoreDep, settings: SettingsDep,
    sha256: Annotated[str | None, Header(alias=SHA256_HEADER)] = None,
) -> UploadReply:
    """A checkpoint archive: streamed to storage and sha256-checked, then checked against the job
    (shared/checkpoint.py) outside any database session, and recorded only if it passes and the lease is still
    live. A refused checkpoint is deleted and counts against the worker (422 `checkpoint_rejected`)."""
    token, expected = parse_fencing_token(fencing_token), _declared_sha256(sha256)
    rules = await worker.run(checkpoints.upload_rules, settings=settings, lease_id=lease_id, fencing_token=token)
    checkpoint_id = new_id("ftckpt-")
    limit = min(settings.max_adapter_bytes, rules.upload_limit())
    try:
        blob = await store.put_stream(checkpoints.checkpoint_key(checkpoint_id), request.stream(), max_bytes=limit,
                                      expected_sha256=expected)
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


@router.put("/leases/{lease_id}/adapter", response_model=UploadReply)
async def upload_adapter(
    request: Request, lease_id: LeaseId, worker: CurrentWorker, fencing_token: FencingToken, store: StoreDep,
    settings: SettingsDep, sha256: Annotated[str | None, Header(alias=SHA256_HEADER)] = None,
) -> UploadReply:
    token, expected = parse_fencing_token(fencing_token), _declared_sha256(sha256)
    limit = await worker.run(leases.adapter_upload_limit, lease_id=lease_id, fencing_token=token)
    blob = await store.put_stream(leases.adapter_upload_key(lease_id), request.stream(),
                                  max_bytes=min(settings.max_adapter_bytes, limit + limit // 1000 + 64 * 1024),
                                  expected_sha256=expected)
    await worker.run(leases.record_adapter, store=store, lease_id=lease_id, fencing_token=token, blob=blob)
    return UploadReply(lease_id=lease_id, kind="adapter", sha256=blob.sha256, bytes=blob.bytes)


@router.post("/leases/{lease_id}/complete", response_model=LeaseReply)
async def complete_lease(lease_id: LeaseId, body: LeaseComplete, worker: CurrentWorker, fencing_token: FencingToken,
                         store: StoreDep, settings: SettingsDep) -> LeaseReply:
    token = parse_fencing_token(fencing_token)
    return lease_reply(await worker.run(leases.complete, store=store, settings=settings, lease_id=lease_id,
                                        fencing_token=token, report=body))


@router.post("/leases/{lease_id}/fail", response_model=LeaseReply)
async def fail_lease(lease_id: LeaseId, body: LeaseFail, worker: CurrentWorker, fencing_token: FencingToken,
                     store: StoreDep, settings: SettingsDep) -> LeaseReply:
    token = parse_fencing_token(fencing_token)
    if body.kind == "bad_checkpoint":  # a claim about another worker's upload: the coordinator checks it first
        return lease_reply(await worker.run(checkpoints.report_bad, store=store, settings=settings, lease_id=lease_id,
                                            fencing_token=token, report=body))
    return lease_reply(await worker.run(leases.fail, settings=settings, lease_id=lease_id, fencing_token=token,
                                        report=body))


@router.post("/leases/{lease_id}/preempted", response_model=LeaseReply)
async def preempt_lease(lease_id: LeaseId, body: LeasePreempted, worker: CurrentWorker, fencing_token: FencingToken,
                        settings: SettingsDep) -> LeaseReply:
    token = parse_fencing_token(fencing_token)
    return lease_reply(await worker.run(leases.preempted, settings=settings, lease_id=lease_id, fencing_token=token,
                                        report=body))


"""`/v1/workers`: a provider's machines (register, list, revoke) and the agent's link (heartbeat, claim). What
an agent does with a lease it holds is `leases.py`. Shapes live in `shared/protocol.py`."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response

from coordinator.api.deps import CurrentWorker, ProviderCaller, SettingsDep, reject_unknown_query
from coordinator.api.errors import ERROR_RESPONSES
from coordinator.db.tables import WorkerModel, utcnow
from coordinator.metrics import CLAIM_SECONDS
from coordinator.services import leases, workers
from shared.errors import InvalidRequest
from shared.money import micros_to_usd
from shared.protocol import (
    FENCING_TOKEN_HEADER, PROTOCOL_HEADER, ClaimReply, ClaimRequest, HeartbeatReply, WorkerHeartbeat, WorkerRegister, WorkerRegistered, is_supported,
)
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
        lost_leases=worker.lost_leases, failed_checks=worker.failed_checks, preempted_leases=worker.preempted_leases,
        preemption_strikes=worker.preemption_strikes, unconfirmed_claims=worker.unconfirmed_claims,
        agent_version=worker.agent_version,
        created_at=int(worker.created_at.timestamp()),
        last_heartbeat_at=int(worker.last_heartbeat_at.timestamp()) if worker.last_heartbeat_at else None,
        suspended=worker.suspended_at is not None, revoked=worker.revoked_at is not None,
    )


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
    await request.app.state.hot.revoke_token(worker.token_prefix, worker.id)  # every process forgets it at once
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
    began = time.perf_counter()
    reply = await _claim(request, body, worker, settings)
    CLAIM_SECONDS.labels("assigned" if reply.assignment is not None else "empty").observe(time.perf_counter() - began)
    return reply


async def _claim(request: Request, body: ClaimRequest, worker: CurrentWorker, settings: SettingsDep) -> ClaimReply:
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

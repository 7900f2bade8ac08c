"""Workers: registration with a provider key (the token is shown once, stored hashed), token
authentication, heartbeats written to the database, and the commands a heartbeat reply carries.

A worker token reads `tgw_<prefix>_<secret>`, like API keys: the prefix finds the row and only a
sha256 of the secret is kept, compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.ids import new_id
from coordinator.db.models import (
    LIVE_LEASE, AccountModel, JobModel, JobStatus, LeaseModel, LeaseStatus, Role, WorkerModel, WorkerState, utcnow,
)
from coordinator.effects import effects
from coordinator.services.paging import page
from shared.errors import AuthenticationFailed, NotFound, PermissionDenied
from shared.money import usd_to_micros
from shared.pricing import CPU, gpu_class_for
from shared.protocol import WORKER_TOKEN_SCHEME, Command, GpuTelemetry, WorkerHeartbeat, WorkerRegister

_PREFIX_CHARS = 12


def token_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_token(token: str) -> tuple[str, str] | None:
    scheme, _, rest = token.partition("_")
    prefix, _, secret = rest.partition("_")
    if scheme != WORKER_TOKEN_SCHEME or len(prefix) != _PREFIX_CHARS or not secret:
        return None
    return prefix, secret


def _new_token() -> tuple[str, str, str]:
    prefix = secrets.token_hex(_PREFIX_CHARS // 2)
    secret = secrets.token_urlsafe(32).replace("_", "x").replace("-", "y")
    return prefix, token_sha256(secret), f"{WORKER_TOKEN_SCHEME}_{prefix}_{secret}"


def _best_device(request: WorkerRegister) -> dict[str, Any]:
    """The device placement counts on: the shared GPU with the most memory, else the CPU."""
    shared = [g for g in request.gpus if request.policy.shared_gpus is None or g.uuid in request.policy.shared_gpus]
    if shared:
        gpu = max(shared, key=lambda g: g.memory_total_bytes)
        return {"gpu_class": gpu_class_for(gpu.name).id, "gpu_name": gpu.name, "vram_total_bytes": gpu.memory_total_bytes,
                "compute_capability": gpu.compute_capability}
    memory = request.cpu.memory_bytes if request.cpu else 0
    return {"gpu_class": CPU.id, "gpu_name": CPU.label, "vram_total_bytes": memory, "compute_capability": None}


def register(*, session: Session, account: AccountModel, request: WorkerRegister, protocol_version: int) -> tuple[WorkerModel, str]:
    """Register a machine (or re-register it: same worker, new token, fresh inventory, reputation kept)."""
    prefix, digest, token = _new_token()
    device = _best_device(request)
    worker = session.scalars(
        select(WorkerModel).where(WorkerModel.account_id == account.id, WorkerModel.machine_id == request.machine_id)
        .with_for_update()
    ).one_or_none()
    if worker is not None and worker.revoked_at is not None:
        raise PermissionDenied(f"Worker {worker.id} on this machine was revoked; ask the operator.", code="worker_revoked")
    fields = dict(
        name=request.name or request.machine_id, token_prefix=prefix, token_sha256=digest,
        agent_version=request.agent_version, protocol_version=protocol_version,
        driver_version=request.driver_version, cuda_version=request.cuda_version,
        gpus=[g.model_dump() for g in request.gpus], cpu=request.cpu.model_dump() if request.cpu else None,
        vram_free_bytes=device["vram_total_bytes"], ask_price_per_gpu_hour=usd_to_micros(request.ask_price_per_gpu_hour),
        policy=request.policy.model_dump(), cached_models=list(request.cached_models), **device,
    )
    if worker is None:
        worker = WorkerModel(id=new_id("wrk-"), account_id=account.id, machine_id=request.machine_id,
                             state=WorkerState.offline, **fields)
        session.add(worker)
    else:
        for name, value in fields.items():
            setattr(worker, name, value)
        if worker.state is not WorkerState.suspended:
            worker.state = WorkerState.offline if worker.state is not WorkerState.working else worker.state
    session.commit()
    return worker, token


def authenticate(*, session: Session, token: str) -> WorkerModel:
    """The worker a bearer token belongs to; unknown, malformed or revoked tokens are a 401."""
    invalid = AuthenticationFailed("Incorrect worker token.", code="invalid_worker_token")
    parts = split_token(token)
    if parts is None:
        raise invalid
    prefix, secret = parts
    worker = session.scalars(select(WorkerModel).where(WorkerModel.token_prefix == prefix)).one_or_none()
    presented = token_sha256(secret)  # hashed even without a row, so timing does not tell prefixes apart
    if not hmac.compare_digest(presented, worker.token_sha256 if worker else "0" * 64) or worker is None:
        raise invalid
    if worker.revoked_at is not None:
        raise AuthenticationFailed("This worker has been revoked.", code="worker_revoked")
    return worker


def get_owned(*, session: Session, account: AccountModel, worker_id: str) -> WorkerModel:
    worker = session.get(WorkerModel, worker_id)
    if worker is None or (worker.account_id != account.id and account.role is not Role.admin):
        raise NotFound(f"No such worker: {worker_id}", param="worker_id")
    return worker


def list_workers(*, session: Session, account: AccountModel, after: str | None, limit: int) -> tuple[list[WorkerModel], bool]:
    """A provider's own workers; an admin sees every worker."""
    stmt = select(WorkerModel)
    if account.role is not Role.admin:
        stmt = stmt.where(WorkerModel.account_id == account.id)
    return page(session=session, stmt=stmt, id_column=WorkerModel.id, after=after, limit=limit)


def revoke(*, session: Session, account: AccountModel, worker_id: str) -> WorkerModel:
    worker = get_owned(session=session, account=account, worker_id=worker_id)
    if worker.revoked_at is None:
        worker.revoked_at = utcnow()
        worker.state = WorkerState.offline
        worker.available_until = None
        effects(session).recheck.add(worker.id)
    session.commit()
    return worker


def free_vram(worker: WorkerModel, gpus: list[GpuTelemetry]) -> int:
    """Free memory on the device placement counts on, from fresh telemetry when the agent sent it."""
    if worker.gpu_class == CPU.id:
        return worker.vram_total_bytes
    best_uuid = max(worker.gpus, key=lambda g: g["memory_total_bytes"])["uuid"] if worker.gpus else None
    for gpu in gpus:
        if gpu.uuid == best_uuid and gpu.memory_free_bytes is not None:
            return gpu.memory_free_bytes
    return worker.vram_free_bytes


def record_heartbeat(
    *, session: Session, worker: WorkerModel, heartbeat: WorkerHeartbeat, received_at: datetime,
) -> list[Command]:
    """Write a heartbeat to the worker's row, renew its lease, and say what the agent must do."""
    worker.last_heartbeat_at = received_at
    worker.telemetry = heartbeat.model_dump(exclude_none=True)
    worker.vram_free_bytes = free_vram(worker, heartbeat.gpus)
    if heartbeat.cached_models is not None:
        worker.cached_models = list(heartbeat.cached_models)
    if worker.state not in (WorkerState.suspended, WorkerState.working):
        if heartbeat.activity == "paused_by_owner":
            worker.state, worker.pause_reason, worker.available_until = WorkerState.paused, heartbeat.pause_reason, None
        elif heartbeat.activity == "unavailable":
            worker.state, worker.pause_reason, worker.available_until = WorkerState.offline, heartbeat.pause_reason, None
        elif worker.state in (WorkerState.paused, WorkerState.offline):
            worker.state, worker.pause_reason = WorkerState.idle, None
    commands: list[Command] = []
    if heartbeat.lease_id is not None:
        lease = session.get(LeaseModel, heartbeat.lease_id)
        if lease is None or lease.worker_id != worker.id:
            commands.append(Command(type="lease_lost", lease_id=heartbeat.lease_id, reason="unknown lease"))
        elif lease.status in LIVE_LEASE:
            lease.last_renewed_at = received_at
            lease.suspect_at = None
            if heartbeat.step is not None:
                lease.last_step = max(lease.last_step or 0, heartbeat.step)
        else:
            commands.append(lease_command(session=session, lease=lease))
    session.commit()
    return commands


def lease_command(*, session: Session, lease: LeaseModel) -> Command:
    """What an agent still running an ended lease must do: stop, and whether the job was cancelled or paused."""
    job = session.get(JobModel, lease.job_id)
    if lease.status is LeaseStatus.cancelled and job is not None and job.status is JobStatus.paused:
        return Command(type="pause", lease_id=lease.id, reason="the customer paused the job")
    if lease.status is LeaseStatus.cancelled:
        return Command(type="cancel", lease_id=lease.id, reason="the customer cancelled the job")
    return Command(type="lease_lost", lease_id=lease.id, reason=lease.end_reason or f"lease is {lease.status.value}")

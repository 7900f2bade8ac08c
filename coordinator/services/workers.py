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

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.db.ids import new_id
from coordinator.db.tables import (
    LIVE_LEASE, AccountModel, JobModel, JobStatus, LeaseModel, LeaseStatus, Role, WorkerModel, WorkerState,
)
from coordinator.effects import effects
from coordinator.services import lease_states, worker_states
from coordinator.services.paging import page
from coordinator.settings import CoordinatorSettings
from shared.errors import AuthenticationFailed, Conflict, NotFound, PermissionDenied
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


def register(
    *, session: Session, account: AccountModel, request: WorkerRegister, protocol_version: int, max_workers: int,
) -> tuple[WorkerModel, str]:
    """Register a machine (or re-register it: same worker, new token, fresh inventory, reputation kept; a new
    machine starts from its provider's record, suspended when the provider has a suspended machine). A
    provider has at most `max_workers` machines that are not revoked (registrations of one provider queue on its
    account's row, so the cap holds under concurrency)."""
    prefix, digest, token = _new_token()
    device = _best_device(request)
    session.get(AccountModel, account.id, with_for_update=True)
    worker = session.scalars(
        select(WorkerModel).where(WorkerModel.account_id == account.id, WorkerModel.machine_id == request.machine_id)
        .with_for_update()
    ).one_or_none()
    if worker is not None and worker.revoked_at is not None:
        raise PermissionDenied(f"Worker {worker.id} on this machine was revoked; ask the operator.", code="worker_revoked")
    if worker is None:
        registered = session.scalar(select(func.count()).select_from(WorkerModel).where(
            WorkerModel.account_id == account.id, WorkerModel.revoked_at.is_(None))) or 0
        if registered >= max_workers:
            raise Conflict(f"This provider already has {registered} registered workers, the most allowed; revoke one "
                           f"(POST /v1/workers/{{id}}/revoke) or ask the operator for more.", code="worker_limit_reached")
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
        worker_states.new_machine(session, worker)
    else:
        for name, value in fields.items():
            setattr(worker, name, value)
        worker_states.registered(worker)
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


def revoke(*, session: Session, account: AccountModel, worker_id: str, settings: CoordinatorSettings) -> WorkerModel:
    """Revoke a worker: its token stops working, and a job it holds goes back to the queue at once."""
    worker = get_owned(session=session, account=account, worker_id=worker_id)
    if worker.revoked_at is None:
        lease_states.release_revoked(session=session, worker=worker, settings=settings)
        worker = session.get(WorkerModel, worker.id, with_for_update=True, populate_existing=True)  # type: ignore[assignment]
        worker_states.revoke(session, worker)
    session.commit()
    return worker


def suspend(*, session: Session, worker_id: str, reason: str, settings: CoordinatorSettings) -> WorkerModel:
    """An admin suspends a worker: it is never placed again until lifted, and a job it holds resumes elsewhere."""
    worker = session.get(WorkerModel, worker_id)
    if worker is None:
        raise NotFound(f"No such worker: {worker_id}", param="worker_id")
    if worker.suspended_at is None:
        lease_states.release_revoked(session=session, worker=worker, settings=settings,
                                     why=f"suspended by an admin: {reason}")
        worker = session.get(WorkerModel, worker_id, with_for_update=True, populate_existing=True)  # type: ignore[assignment]
        worker_states.suspend(session, worker, reason=reason)
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


def flush_heartbeats(*, session: Session, batch: dict[str, tuple[WorkerHeartbeat, datetime]]) -> set[str]:
    """Write a batch of heartbeats (the latest per worker) in a few statements and renew their leases.
    Returns the workers whose reported lease has ended or is unknown: they must hear a command.

    Leases before workers, each in id order: the lock order of every other path (job, lease, worker), so
    two processes flushing overlapping batches, or a flush beside a cancel, cannot deadlock.
    """
    if not batch:
        return set()
    ordered = sorted(batch.items())
    conn = session.connection()
    reported = {hb.lease_id: worker_id for worker_id, (hb, _) in ordered if hb.lease_id is not None}
    stale: set[str] = set()
    if reported:
        lease_states.renew_reported(conn, sorted(
            ({"b_lease": hb.lease_id, "b_id": worker_id, "b_seen": seen, "b_step": hb.step if hb.step is not None else -1}
             for worker_id, (hb, seen) in ordered if hb.lease_id is not None), key=lambda row: row["b_lease"]))
        live = dict(session.execute(select(LeaseModel.id, LeaseModel.worker_id).where(
            LeaseModel.id.in_(list(reported)), LeaseModel.status.in_(LIVE_LEASE))).all())  # type: ignore[arg-type]
        stale = {worker_id for lease_id, worker_id in reported.items() if live.get(lease_id) != worker_id}
        worker_states.back_at_work(conn, sorted(
            worker_id for lease_id, worker_id in reported.items() if live.get(lease_id) == worker_id))
    worker_states.heard(conn, [
        {"b_id": worker_id, "b_seen": seen, "b_telemetry": hb.model_dump(exclude_none=True),
         "b_activity": hb.activity, "b_reason": hb.pause_reason}
        for worker_id, (hb, seen) in ordered
    ])
    session.commit()
    effects(session).recheck.update(stale)
    return stale


def record_heartbeat(
    *, session: Session, worker: WorkerModel, heartbeat: WorkerHeartbeat, received_at: datetime,
) -> list[Command]:
    """A heartbeat that must read the database now (its lease changed): write it and say what to do."""
    stale = flush_heartbeats(session=session, batch={worker.id: (heartbeat, received_at)})
    effects(session).recheck.discard(worker.id)  # it hears the command in this very reply
    if heartbeat.cached_models is not None:
        worker.cached_models = list(heartbeat.cached_models)
        session.commit()
    if worker.id not in stale or heartbeat.lease_id is None:
        return []
    lease = session.get(LeaseModel, heartbeat.lease_id)
    if lease is None or lease.worker_id != worker.id:
        return [Command(type="lease_lost", lease_id=heartbeat.lease_id, reason="unknown lease")]
    return [lease_command(session=session, lease=lease)]


def lease_command(*, session: Session, lease: LeaseModel) -> Command:
    """What an agent still running an ended lease must do: stop, and whether the job was cancelled or paused."""
    job = session.get(JobModel, lease.job_id)
    if lease.status is LeaseStatus.cancelled and job is not None and job.status is JobStatus.paused:
        return Command(type="pause", lease_id=lease.id, reason="the customer paused the job")
    if lease.status is LeaseStatus.cancelled:
        return Command(type="cancel", lease_id=lease.id, reason="the customer cancelled the job")
    return Command(type="lease_lost", lease_id=lease.id, reason=lease.end_reason or f"lease is {lease.status.value}")

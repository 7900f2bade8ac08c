"""SQLAlchemy 2 typed models: the coordinator's source of truth. Alembic owns the schema."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON, BigInteger, Boolean, DateTime, Enum, Float, ForeignKey, Index, Integer, MetaData, String, Text, UniqueConstraint, text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on both SQLite (which drops tzinfo) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Public ids sort in creation order byte by byte ("0-9A-Za-z"); a locale collation (en_US) would
# interleave cases and break "newest first" paging, so PostgreSQL compares them in the C collation.
PublicId = String(40).with_variant(String(40, collation="C"), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(none_as_null=True), list[Any]: JSON(none_as_null=True)}


class Role(enum.StrEnum):
    customer = "customer"
    provider = "provider"
    admin = "admin"


class FileStatus(enum.StrEnum):
    uploaded = "uploaded"
    processed = "processed"
    error = "error"


class JobStatus(enum.StrEnum):
    validating_files = "validating_files"
    queued = "queued"
    running = "running"
    paused = "paused"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class WorkerState(enum.StrEnum):
    idle = "idle"  # long-polling for work
    working = "working"  # holds a lease
    paused = "paused"  # the owner's policy stepped aside (game, heat, schedule)
    offline = "offline"  # not heard from within the lease ttl
    suspended = "suspended"  # by an admin or for failed checks; never placed


class LeaseStatus(enum.StrEnum):
    assigned = "assigned"  # placed; the worker has not picked it up yet
    running = "running"  # the worker holds it
    completed = "completed"
    failed = "failed"
    preempted = "preempted"
    lost = "lost"  # not renewed within the grace, or never picked up
    cancelled = "cancelled"  # the job was cancelled or paused under it


LIVE_LEASE = (LeaseStatus.assigned, LeaseStatus.running)


def _enum(cls: type[enum.Enum]) -> Enum:
    # Stored as plain strings (no native PG enum) so adding a state is a code change, not a migration.
    return Enum(cls, native_enum=False, length=32, validate_strings=True, values_callable=lambda e: [m.value for m in e])


class AccountModel(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(PublicId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[Role] = mapped_column(_enum(Role))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled_at: Mapped[datetime | None]

    api_keys: Mapped[list[ApiKeyModel]] = relationship(back_populates="account")


class ApiKeyModel(Base):
    """A bearer key: only a sha256 of its secret is stored; `prefix` finds the row."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(PublicId, primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    account: Mapped[AccountModel] = relationship(back_populates="api_keys", lazy="joined")


class FileModel(Base):
    __tablename__ = "files"
    __table_args__ = (Index("ix_files_account_id_id", "account_id", "id"),)

    id: Mapped[str] = mapped_column(PublicId, primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[FileStatus] = mapped_column(_enum(FileStatus))
    status_details: Mapped[str | None] = mapped_column(Text)
    format: Mapped[str | None] = mapped_column(String(32))
    examples: Mapped[int | None]
    estimated_tokens: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    deleted_at: Mapped[datetime | None]


class JobModel(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_account_id_id", "account_id", "id"),
        Index("ix_jobs_status", "status"),
    )

    id: Mapped[str] = mapped_column(PublicId, primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    model: Mapped[str] = mapped_column(String(100))
    training_file_id: Mapped[str] = mapped_column(ForeignKey("files.id"))
    validation_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id"))
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus))
    hyperparameters: Mapped[dict[str, Any]]
    lora: Mapped[dict[str, Any]]
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    job_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON(none_as_null=True))
    max_price_per_gpu_hour: Mapped[int | None] = mapped_column(BigInteger)  # Micros
    max_cost: Mapped[int | None] = mapped_column(BigInteger)  # Micros
    min_vram_gb: Mapped[int | None]
    gpu_filter: Mapped[list[Any] | None]
    trusted_hosts_only: Mapped[bool] = mapped_column(Boolean, default=False)
    estimated_tokens: Mapped[int] = mapped_column(BigInteger)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(200))
    result_files: Mapped[list[Any]] = mapped_column(JSON(none_as_null=True), default=list)
    error: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None]
    estimated_finish: Mapped[datetime | None]
    # The last fencing token issued (each lease gets the next); worker losses so far.
    fencing_token: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Every UPDATE checks and bumps it, so two concurrent status changes cannot both win.
    version: Mapped[int] = mapped_column(Integer, default=1)

    __mapper_args__ = {"version_id_col": version}


class JobEventModel(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[str] = mapped_column(PublicId, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None]

    job: Mapped[JobModel] = relationship(lazy="raise")  # orders the INSERTs after the job's


class JobCheckpointModel(Base):
    __tablename__ = "job_checkpoints"
    __table_args__ = (Index("ix_job_checkpoints_job_id_id", "job_id", "id"),)

    id: Mapped[str] = mapped_column(PublicId, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step_number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]]
    fine_tuned_model_checkpoint: Mapped[str] = mapped_column(String(240))
    blob_sha256: Mapped[str | None] = mapped_column(String(64))
    blob_bytes: Mapped[int | None] = mapped_column(BigInteger)
    lease_id: Mapped[str | None] = mapped_column(String(40))  # the lease that uploaded it (no FK: leases refer here)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[JobModel] = relationship(lazy="raise")


class WorkerModel(Base):
    """A provider's machine running the agent: its inventory, price, policy and reputation."""

    __tablename__ = "workers"
    __table_args__ = (
        UniqueConstraint("account_id", "machine_id"),
        Index("ix_workers_state_available_until", "state", "available_until"),
    )

    id: Mapped[str] = mapped_column(PublicId, primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    machine_id: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(128))
    token_prefix: Mapped[str] = mapped_column(String(16), unique=True)
    token_sha256: Mapped[str] = mapped_column(String(64))
    agent_version: Mapped[str] = mapped_column(String(128))
    protocol_version: Mapped[int] = mapped_column(Integer)
    driver_version: Mapped[str | None] = mapped_column(String(128))
    cuda_version: Mapped[str | None] = mapped_column(String(128))
    gpus: Mapped[list[Any]] = mapped_column(JSON(none_as_null=True), default=list)  # GpuInventory dicts
    cpu: Mapped[dict[str, Any] | None]
    # Placement reads these instead of the JSON: the class and capacity of the worker's best device.
    gpu_class: Mapped[str] = mapped_column(String(32))
    gpu_name: Mapped[str] = mapped_column(String(128))
    vram_total_bytes: Mapped[int] = mapped_column(BigInteger)
    vram_free_bytes: Mapped[int] = mapped_column(BigInteger)
    compute_capability: Mapped[str | None] = mapped_column(String(8))
    ask_price_per_gpu_hour: Mapped[int] = mapped_column(BigInteger)  # Micros
    policy: Mapped[dict[str, Any]]
    cached_models: Mapped[list[Any]] = mapped_column(JSON(none_as_null=True), default=list)
    state: Mapped[WorkerState] = mapped_column(_enum(WorkerState))
    pause_reason: Mapped[str | None] = mapped_column(Text)
    # Placeable while idle and long-polling: each claim extends this a little past its wait.
    available_until: Mapped[datetime | None]
    last_heartbeat_at: Mapped[datetime | None]
    telemetry: Mapped[dict[str, Any] | None]  # the latest heartbeat, written at most every few seconds
    trusted: Mapped[bool] = mapped_column(Boolean, default=False)  # vetted by an admin
    reliability: Mapped[float] = mapped_column(Float, default=0.9)
    speed_factor: Mapped[float] = mapped_column(Float, default=1.0)  # measured / expected tokens per second
    completed_leases: Mapped[int] = mapped_column(Integer, default=0)
    lost_leases: Mapped[int] = mapped_column(Integer, default=0)
    failed_checks: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    suspended_at: Mapped[datetime | None]


class LeaseModel(Base):
    """One attempt at a job on one worker, fenced by a token that only grows per job."""

    __tablename__ = "leases"
    __table_args__ = (
        UniqueConstraint("job_id", "fencing_token"),
        Index("ix_leases_worker_id_status", "worker_id", "status"),
        Index("ix_leases_status_last_renewed_at", "status", "last_renewed_at"),
        # At most one live lease per job, whatever bug or race might try otherwise.
        Index("uq_leases_live_job_id", "job_id", unique=True,
              postgresql_where=text("status IN ('assigned', 'running')"),
              sqlite_where=text("status IN ('assigned', 'running')")),
    )

    id: Mapped[str] = mapped_column(PublicId, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    worker_id: Mapped[str] = mapped_column(ForeignKey("workers.id"))
    fencing_token: Mapped[int] = mapped_column(Integer)
    status: Mapped[LeaseStatus] = mapped_column(_enum(LeaseStatus))
    gpu_uuid: Mapped[str | None] = mapped_column(String(128))
    gpu_class: Mapped[str] = mapped_column(String(32))
    ask_price_per_gpu_hour: Mapped[int] = mapped_column(BigInteger)  # Micros: what the provider earns
    price_per_gpu_hour: Mapped[int] = mapped_column(BigInteger)  # Micros: what the customer pays
    resume_checkpoint_id: Mapped[str | None] = mapped_column(ForeignKey("job_checkpoints.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    claimed_at: Mapped[datetime | None]
    training_started_at: Mapped[datetime | None]
    last_renewed_at: Mapped[datetime | None]
    suspect_at: Mapped[datetime | None]
    last_step: Mapped[int | None]
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    ended_at: Mapped[datetime | None]
    end_reason: Mapped[str | None] = mapped_column(Text)
    usage: Mapped[dict[str, Any] | None]  # as the worker reported it
    adapter_key: Mapped[str | None] = mapped_column(String(120))  # the blob of the latest adapter upload
    adapter_sha256: Mapped[str | None] = mapped_column(String(64))
    adapter_bytes: Mapped[int | None] = mapped_column(BigInteger)
    result: Mapped[dict[str, Any] | None]

    job: Mapped[JobModel] = relationship(lazy="raise")
    worker: Mapped[WorkerModel] = relationship(lazy="raise")

"""SQLAlchemy 2 typed tables (`...Model` classes, one per table): the coordinator's source of truth. Alembic owns the schema."""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON, BigInteger, Boolean, Date, DateTime, Enum, Float, ForeignKey, Index, Integer, MetaData, String, Text,
    UniqueConstraint, and_, text,
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


class LeaseKind(enum.StrEnum):
    """What a lease asks the worker to run: each kind is a program of the trainer's image (`worker/trainer`)."""

    train = "train"  # QLoRA fine-tuning: checkpoints, then an adapter
    verify = "verify"  # another provider's adapter and the base, evaluated on data its trainer never received
    export = "export"  # a job's adapter merged into its base, as 16-bit safetensors and GGUF files


class JobKind(enum.StrEnum):
    """What a row of `jobs` is: a customer's fine-tuning job, or the export of one (services/exports.py)."""

    fine_tuning = "fine_tuning"
    export = "export"


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
    uses_tools: Mapped[bool] = mapped_column(Boolean, default=False)  # tools or tool calls: needs a model that has them
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    deleted_at: Mapped[datetime | None]


class JobModel(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_account_id_id", "account_id", "id"),
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_parent_job_id", "parent_job_id"),
    )

    id: Mapped[str] = mapped_column(PublicId, primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    # A fine-tuning job, or an export of its `parent_job_id`'s adapter; `export`: a fine-tuning job's formats asked
    # for at creation, an export's formats, checkpoint and result files (services/exports.py).
    kind: Mapped[str] = mapped_column(String(16), default=JobKind.fine_tuning.value)
    parent_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    export: Mapped[dict[str, Any] | None]
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
    # Where max_price_per_gpu_hour came from: the customer's, or the market's default cap (services/market.py).
    max_price_source: Mapped[str | None] = mapped_column(String(16))
    # Never placed on these again: providers whose claim about the job is unconfirmed or whose work failed
    # verification, workers the preemption rule took off it (services/placement.py).
    excluded_providers: Mapped[list[Any] | None]
    excluded_workers: Mapped[list[Any] | None]
    # The kind of lease the job is queued for (`LeaseKind`): training, then verification when it is chosen.
    stage: Mapped[str] = mapped_column(String(16), default="train")
    verification_mode: Mapped[str] = mapped_column(String(16), default="auto")  # auto | always | redundant (the customer asks)
    # The held-out sample no trainer receives: {"examples", "sha256", "bytes", "training_sha256", "training_bytes"}
    # (services/held_out.py); None when the file was too small to keep any back.
    held_out: Mapped[dict[str, Any] | None]
    verification: Mapped[dict[str, Any] | None]  # what verification found (services/verification.py)
    method: Mapped[str] = mapped_column(String(16), default="supervised")  # supervised | dpo
    # The fine-tune or checkpoint the job continues, as the customer named it, and the adapter it starts from:
    # {"key", "sha256", "member", "job_id", "step"} (services/continuation.py); None for a fresh LoRA.
    initial_model: Mapped[str | None] = mapped_column(String(240))
    initial_adapter: Mapped[dict[str, Any] | None]
    # {"patience"}, then what happened: {"best_step", "stopped_early", "reason"} (services/early_stopping.py).
    early_stopping: Mapped[dict[str, Any] | None]
    integrations: Mapped[list[Any] | None]  # [{"type": "wandb", "wandb": {...}}] (services/integrations.py)
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
    # Money (issue 6), all Micros: what the job holds of the customer's balance now, what its ended leases
    # were charged, and the running lease's price and billable start (for "cost so far" without a join).
    held_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    billed_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    hold_seq: Mapped[int] = mapped_column(Integer, default=0)  # holds and releases so far; names their ledger entries
    accruing_since: Mapped[datetime | None]
    accruing_price: Mapped[int | None] = mapped_column(BigInteger)
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
    # A checkpoint a worker could not open and the coordinator confirmed bad: listed, never resumed from.
    quarantined_at: Mapped[datetime | None]
    quarantine_reason: Mapped[str | None] = mapped_column(Text)

    job: Mapped[JobModel] = relationship(lazy="raise")

    @classmethod
    def resumable(cls) -> Any:
        """The condition on a checkpoint a job may resume from: its content is kept and it is not quarantined."""
        return and_(cls.blob_sha256.is_not(None), cls.quarantined_at.is_(None))


class HeldOutViewerModel(Base):
    """A provider one of whose workers held a verification lease of a job with this held-out sample (it may have
    downloaded it): it never trains a job that holds back the same sample. Jobs on the same data keep back the
    same examples (`held_out.py`), so this is kept per sample, not per job."""

    __tablename__ = "held_out_viewers"
    __table_args__ = (Index("ix_held_out_viewers_sample_sha256", "sample_sha256"),)

    provider_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    sample_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    first_seen_at: Mapped[datetime] = mapped_column(default=utcnow)


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
    lease_kinds: Mapped[list[Any] | None]  # the kinds its agent said it runs (claims); None: training only
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
    preempted_leases: Mapped[int] = mapped_column(Integer, default=0)
    preemption_strikes: Mapped[int] = mapped_column(Integer, default=0)  # preemptions the written rule counts against it
    unconfirmed_claims: Mapped[int] = mapped_column(Integer, default=0)  # user errors no second worker confirmed
    # The provider's record when this machine registered (its other machines' counters): a new machine starts there.
    inherited_completed: Mapped[int] = mapped_column(Integer, default=0)
    inherited_lost: Mapped[int] = mapped_column(Integer, default=0)
    inherited_failed_checks: Mapped[int] = mapped_column(Integer, default=0)
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
    kind: Mapped[str] = mapped_column(String(16), default=LeaseKind.train.value)
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
    claim: Mapped[str | None] = mapped_column(String(32))  # what the worker claimed about the job: `user_error`

    job: Mapped[JobModel] = relationship(lazy="raise")
    worker: Mapped[WorkerModel] = relationship(lazy="raise")


# --- money (issue 6) -------------------------------------------------------------------------------

class Book(enum.StrEnum):
    """A ledger account kind. The first three belong to someone (`owner_id` is an account id); the others are
    the house's (`owner_id` is '')."""

    customer_available = "customer_available"  # prepaid credit free to spend
    customer_held = "customer_held"  # set aside for queued and running jobs
    provider_payable = "provider_payable"  # earned, not yet paid out
    platform_revenue = "platform_revenue"  # our fee
    platform_grants = "platform_grants"  # credit admins granted (a cost to us)
    stripe_clearing = "stripe_clearing"  # money in (top-ups) and out (transfers) through Stripe
    refunds = "refunds"  # credit admins gave back for jobs (a cost to us, like grants)
    verification = "verification"  # what verifiers earned checking others' work (a cost to us)


OWNED_BOOKS = frozenset({Book.customer_available, Book.customer_held, Book.provider_payable})
LedgerId = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements only INTEGER PRIMARY KEY


class LedgerTransactionModel(Base):
    """One balanced set of postings, posted at most once per business key (e.g. `settle:<lease id>`)."""

    __tablename__ = "ledger_transactions"
    __table_args__ = (Index("ix_ledger_transactions_account_id_id", "account_id", "id"),)

    id: Mapped[str] = mapped_column(PublicId, primary_key=True)
    business_key: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    account_id: Mapped[str | None] = mapped_column(PublicId)  # the customer or provider it concerns
    job_id: Mapped[str | None] = mapped_column(PublicId)
    lease_id: Mapped[str | None] = mapped_column(PublicId)
    description: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LedgerPostingModel(Base):
    __tablename__ = "ledger_postings"
    __table_args__ = (Index("ix_ledger_postings_book_owner_id", "book", "owner_id"),)

    id: Mapped[int] = mapped_column(LedgerId, primary_key=True, autoincrement=True)
    transaction_id: Mapped[str] = mapped_column(ForeignKey("ledger_transactions.id"), index=True)
    book: Mapped[Book] = mapped_column(_enum(Book))
    owner_id: Mapped[str] = mapped_column(PublicId, default="")
    amount: Mapped[int] = mapped_column(BigInteger)  # Micros; a transaction's postings sum to zero


class LedgerBalanceModel(Base):
    """The running sum of an owned book's postings, kept in the same transaction as they are posted, so a hold
    can lock and check it. The house books have no row: they are summed when read (no hot row to queue on)."""

    __tablename__ = "ledger_balances"

    book: Mapped[Book] = mapped_column(_enum(Book), primary_key=True)
    owner_id: Mapped[str] = mapped_column(PublicId, primary_key=True)
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class UsageRecordModel(Base):
    """What one lease is billed: the coordinator's observation, the worker's report, the rule that applied."""

    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_records_customer_id_usage_day", "customer_id", "usage_day"),
        Index("ix_usage_records_provider_id_created_at", "provider_id", "created_at"),
    )

    lease_id: Mapped[str] = mapped_column(ForeignKey("leases.id"), primary_key=True)
    job_id: Mapped[str] = mapped_column(PublicId, index=True)
    customer_id: Mapped[str] = mapped_column(PublicId)
    provider_id: Mapped[str] = mapped_column(PublicId)
    worker_id: Mapped[str] = mapped_column(PublicId)
    gpu_class: Mapped[str] = mapped_column(String(32))
    price_per_gpu_hour: Mapped[int] = mapped_column(BigInteger)
    ask_price_per_gpu_hour: Mapped[int] = mapped_column(BigInteger)
    rule: Mapped[str] = mapped_column(String(32))  # until_end | until_checkpoint | not_billed
    started_at: Mapped[datetime | None]
    billed_until: Mapped[datetime | None]
    observed_seconds: Mapped[float] = mapped_column(Float)
    reported_seconds: Mapped[float | None] = mapped_column(Float)
    billable_seconds: Mapped[int] = mapped_column(BigInteger)
    charge_micros: Mapped[int] = mapped_column(BigInteger)
    provider_micros: Mapped[int] = mapped_column(BigInteger)
    fee_micros: Mapped[int] = mapped_column(BigInteger)
    note: Mapped[str | None] = mapped_column(Text)  # capped by max_cost, the worker reported less, ...
    usage_day: Mapped[date] = mapped_column(Date)  # UTC day the lease ended
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TopupStatus(enum.StrEnum):
    pending = "pending"  # a Checkout Session is open
    paid = "paid"  # credited from Stripe's signed webhook
    expired = "expired"
    failed = "failed"  # Stripe refused to create the session


class TopupModel(Base):
    __tablename__ = "topups"
    __table_args__ = (
        Index("ix_topups_account_id_id", "account_id", "id"),
        UniqueConstraint("account_id", "request_key"),
    )

    id: Mapped[str] = mapped_column(PublicId, primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    amount: Mapped[int] = mapped_column(BigInteger)  # Micros
    status: Mapped[TopupStatus] = mapped_column(_enum(TopupStatus))
    request_key: Mapped[str] = mapped_column(String(200))  # the client's Idempotency-Key, or the id
    stripe_session_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    checkout_url: Mapped[str | None] = mapped_column(Text)
    failure: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    paid_at: Mapped[datetime | None]


class PayoutAccountModel(Base):
    """A provider's Stripe Connect account."""

    __tablename__ = "payout_accounts"

    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    stripe_account_id: Mapped[str] = mapped_column(String(255), unique=True)
    payouts_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    details_submitted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class PayoutStatus(enum.StrEnum):
    pending = "pending"  # debited from payable; the transfer is in the outbox
    paid = "paid"  # Stripe created the transfer
    failed = "failed"  # Stripe refused it; the amount is back in payable
    reversed = "reversed"  # Stripe reversed the transfer; the amount is back in payable


class PayoutModel(Base):
    __tablename__ = "payouts"
    __table_args__ = (Index("ix_payouts_account_id_id", "account_id", "id"),)

    id: Mapped[str] = mapped_column(PublicId, primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    amount: Mapped[int] = mapped_column(BigInteger)  # Micros (Stripe moves whole cents: see services/payouts.py)
    status: Mapped[PayoutStatus] = mapped_column(_enum(PayoutStatus))
    destination: Mapped[str] = mapped_column(String(255))
    stripe_transfer_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    failure: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]


class OutboxStatus(enum.StrEnum):
    pending = "pending"
    done = "done"
    failed = "failed"  # Stripe refused it for good (a 4xx other than a conflict or rate limit)


class OutboxModel(Base):
    """A call to Stripe, committed before it is made and retried with the same idempotency key until Stripe
    answers: a crash between our commit and Stripe's reply never pays twice nor loses a payment."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_status_next_attempt_at", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(PublicId, primary_key=True)
    operation: Mapped[str] = mapped_column(String(48))
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    subject_id: Mapped[str] = mapped_column(PublicId)  # the top-up, payout or account it is for
    params: Mapped[dict[str, Any]]
    status: Mapped[OutboxStatus] = mapped_column(_enum(OutboxStatus))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    response: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    done_at: Mapped[datetime | None]


class StripeEventModel(Base):
    """Each webhook event id we acted on, so a replayed delivery changes nothing."""

    __tablename__ = "stripe_events"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(100))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)

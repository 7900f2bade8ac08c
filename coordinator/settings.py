"""The coordinator's settings: one pydantic-settings class, environment prefix `TUNEGRID_`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.money import usd_to_micros
from shared.pricing import BPS


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "tunegrid"


class CoordinatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEGRID_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default_factory=_default_data_dir, description="Where the SQLite file and local storage live by default.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default: SQLite file under the data dir.")
    redis_url: str | None = Field(default=None, description="Redis for hot state and the Celery broker; unset: embedded mode.")
    storage_dir: Path | None = Field(default=None, description="Blob storage for datasets, checkpoints and adapters; default: data_dir/storage.")
    storage_url: str | None = Field(default=None, pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9_.-]+)*/?$",
                                    description="`s3://bucket[/prefix]`: blobs in an S3-compatible object store every "
                                    "coordinator host shares, with presigned URLs for workers and downloads; unset: "
                                    "storage_dir on this host's disk.")
    s3_endpoint_url: str | None = Field(default=None, description="The object store's S3 endpoint as this host "
                                        "reaches it (SeaweedFS, MinIO, R2...); unset: AWS.")
    s3_public_endpoint_url: str | None = Field(default=None, description="The endpoint presigned URLs name, as "
                                               "workers and customers reach it; default: s3_endpoint_url.")
    s3_region: str = Field(default="us-east-1", max_length=64)
    s3_access_key_id: str | None = Field(default=None, description="Default: boto3's own chain (AWS_ACCESS_KEY_ID, "
                                         "an instance role...).")
    s3_secret_access_key: str | None = None
    storage_redirect_downloads: bool = Field(default=True, description="With S3, `GET /v1/files/{id}/content` "
                                             "answers 307 to a presigned URL instead of relaying the bytes.")
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, gt=0, description="Largest accepted file upload.")
    min_training_examples: int = Field(default=10, ge=1)
    file_retention_days: int = Field(default=30, ge=1, description="expires_at of uploaded files.")
    scratch_retention_s: int = Field(default=86_400, ge=0, description="How long an ended job's checkpoints keep "
                                     "their content (then only their rows and metrics stay).")
    blob_collect_interval_s: float = Field(default=3600.0, gt=0, description="How often unreferenced, expired and "
                                           "ended jobs' blobs are deleted.")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    auto_migrate: bool | None = Field(default=None, description="Run `alembic upgrade head` at start; default: only on SQLite.")
    db_pool_size: int | None = Field(default=None, ge=1, description="Database connections per API process; "
                                     "with max_overflow, also how many requests one process serves at once. "
                                     "Default: 4 on PostgreSQL (a process runs Python on one core; more concurrency only queues inside "
                                     "it), 1 on SQLite (one writer at a time anyway).")
    db_max_overflow: int = Field(default=2, ge=0, description="Extra connections on PostgreSQL under bursts.")
    db_timeout_s: float = Field(default=10.0, gt=0, description="Wait for a pooled connection / SQLite lock.")
    log_level: str = "info"
    metrics_token: str | None = Field(default=None, description="`GET /metrics` (Prometheus) answers only "
                                      "`Authorization: Bearer <this>`; unset: the endpoint is off.")
    celery_metrics_port: int | None = Field(default=None, ge=1, le=65535, description="A Celery worker serves "
                                            "its task metrics (Prometheus) on this port, for the private network "
                                            "only; unset: not served.")
    log_format: Literal["auto", "json", "text"] = Field(default="auto", description="Log lines as JSON objects (for "
                                                        "a log pipeline) or text; auto: JSON with Redis (production), "
                                                        "text embedded. Either way each carries its request id.")
    # The marketplace (issue 4): worker protocol timing, leases, placement and pricing.
    heartbeat_interval_s: int = Field(default=10, ge=1, le=300, description="How often agents heartbeat.")
    heartbeat_flush_s: float = Field(default=5.0, gt=0, description="Each API process writes the heartbeats "
                                     "it received to the database in one batch this often (a worker's row at "
                                     "most once per period); heartbeats themselves only touch Redis.")
    claim_timeout_s: int = Field(default=25, ge=1, le=30, description="Longest long-poll claim.")
    lease_ttl_s: int = Field(default=30, ge=1, description="A lease not renewed this long is suspect.")
    lease_grace_s: int = Field(default=300, ge=1, description="A lease not renewed this long is lost; its job "
                               "is queued again and resumes from its last checkpoint. Long enough that a home "
                               "network dropping for a few minutes does not kill the job.")
    assignment_ttl_s: int = Field(default=60, ge=1, description="A placed lease not picked up this long goes back.")
    max_attempts: int = Field(default=3, ge=1, le=100, description="Worker losses before a job fails.")
    platform_fee_bps: int = Field(default=2000, ge=0, le=100_000, description="Platform fee on top of the "
                                  "worker's ask, in basis points (2000 = 20%).")
    min_reliability: float = Field(default=0.3, ge=0, le=1, description="Workers below this are not placed.")
    suspend_after_failed_checks: int = Field(default=3, ge=1, description="Failed adapter checks before a "
                                             "worker is suspended.")
    max_adapter_bytes: int = Field(default=2 * 1024**3, gt=0, description="Largest adapter or checkpoint upload.")
    max_export_bytes: int = Field(default=64 * 1024**3, gt=0, description="Largest export upload (a merged model, "
                                  "a GGUF file); each format has its own bound from the model's size.")
    checkpoint_every_steps: int = Field(default=100, ge=1, description="Trainers checkpoint (and evaluate) "
                                        "this often: what a lost worker can cost a job at most.")
    max_checkpoints_per_job: int = Field(default=5, ge=1, description="Checkpoints whose content is kept per job "
                                         "(the newest; older ones keep their metrics).")
    placement_batch: int = Field(default=1000, ge=1, le=100_000, description="Queued jobs one placement pass takes.")
    periodic_tasks: bool | None = Field(default=None, description="Run lease reaping, placement sweeps and "
                                        "score updates in the API process; default: only without Redis (embedded "
                                        "mode). With Redis, run Celery beat and a Celery worker instead.")
    sweep_interval_s: float = Field(default=5.0, gt=0, description="Periodic placement sweeps and lease reaping.")
    integrations_interval_s: float = Field(default=30.0, gt=0, description="How often jobs' new metrics are "
                                           "forwarded to their integrations (Weights & Biases).")
    wandb_mode: Literal["online", "offline"] = Field(default="online", description="`offline` writes W&B runs "
                                                     "under data_dir/wandb instead of sending them (tests, air gaps).")

    # Money (issue 6).
    hold_margin_bps: int = Field(default=12_500, ge=10_000, le=100_000, description="A job holds its estimated "
                                 "cost times this (12500 = 1.25x), capped by its max_cost.")
    min_hold_usd: str = Field(default="0.01", description="The smallest hold a job places.")
    hold_fallback_price_usd: str = Field(default="1.00", description="Price per GPU-hour a hold assumes when no "
                                         "worker could run the job now and it names no max price.")
    market_price_cap_bps: int = Field(default=30_000, ge=BPS, le=1_000_000, description="A job that names no "
                                      "max price is capped at this share of the market price of fitting GPUs "
                                      "(30000 = 3x; services/market.py).")
    max_price_cap_usd: str = Field(default="10.00", description="The highest default cap, and the cap when no "
                                   "fitting GPU is registered.")
    # Independent verification (issue 16; services/verification.py).
    verify_share_bps: int = Field(default=1000, ge=0, le=BPS, description="Share of jobs verified by a worker of "
                                  "another provider (1000 = 10%), besides those of providers below the threshold "
                                  "and those whose customer asks.")
    verify_below_reliability: float = Field(default=0.85, ge=0, le=1, description="Every job trained by a worker "
                                            "below this reliability is verified.")
    verify_min_improvement: float = Field(default=0.02, ge=0, description="The adapter's mean token loss on the "
                                          "held-out sample must be at least this much (nats) below the base's.")
    verify_tolerance: float = Field(default=0.05, ge=0, description="A verifier's validation loss may differ from "
                                    "the trainer's report by this much (nats) plus verify_tolerance_share of it.")
    verify_tolerance_share: float = Field(default=0.03, ge=0, le=1)
    verify_wait_s: int = Field(default=900, ge=1, description="A job the platform chose to verify that finds no "
                               "worker of another provider this long is released unverified.")
    stripe_api_key: str | None = Field(default=None, description="Stripe secret key; unset: no top-ups through "
                                       "Stripe (admins grant credit) and payouts stay pending.")
    stripe_api_base: str | None = Field(default=None, description="Stripe API base URL (a local fake in tests).")
    stripe_webhook_secret: str | None = Field(default=None, description="Signing secret of the webhook endpoint.")
    stripe_timeout_s: float = Field(default=10.0, gt=0, le=120, description="Each call to Stripe.")
    stripe_max_retries: int = Field(default=2, ge=0, le=10, description="Network retries per call (same "
                                    "idempotency key).")
    webhook_tolerance_s: int = Field(default=300, ge=1, description="Oldest Stripe-Signature timestamp accepted.")
    public_url: str = Field(default="http://127.0.0.1:8000", description="Where customers and providers reach us: "
                            "Stripe's Checkout and onboarding pages send them back here.")
    min_payout_usd: str = Field(default="10.00", description="Providers are paid once earnings reach this.")
    payout_interval_s: int = Field(default=86_400, ge=1, description="How often payouts run (Celery beat).")
    outbox_interval_s: float = Field(default=30.0, gt=0, description="How often unsent Stripe calls are retried.")

    rate_limit_per_minute: int = Field(default=1200, ge=0, description="Requests per minute per API key on "
                                       "key-authenticated routes (429 with Retry-After past it); 0: no limit.")
    worker_rate_limit_per_minute: int = Field(default=600, ge=0, description="Requests per minute per worker token "
                                              "on the worker routes (heartbeats, claims, events, uploads); 0: no limit.")
    max_workers_per_provider: int = Field(default=200, ge=1, description="Registered (not revoked) workers a "
                                          "provider may have.")
    # The dashboard (issue 7).
    session_secret: str | None = Field(default=None, description="Signs dashboard session cookies; default: a "
                                       "random secret kept in data_dir/session-secret (0600).")
    session_max_age_s: int = Field(default=12 * 3600, ge=60, description="A dashboard login lasts this long.")

    @field_validator("min_hold_usd", "hold_fallback_price_usd", "min_payout_usd", "max_price_cap_usd")
    @classmethod
    def _usd(cls, value: str) -> str:
        if usd_to_micros(value) < 0:
            raise ValueError("must not be negative")
        return value

    @field_validator("database_url")
    @classmethod
    def _psycopg3(cls, url: str | None) -> str | None:
        # Plain postgresql:// would pick psycopg2, which we do not install.
        if url and url.startswith(("postgresql://", "postgres://")):
            return "postgresql+psycopg://" + url.split("://", 1)[1]
        return url

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'tunegrid.db'}"

    @property
    def resolved_storage_dir(self) -> Path:
        return self.storage_dir or self.data_dir / "storage"

    @property
    def is_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")

    @property
    def connections(self) -> tuple[int, int]:
        """(pool size, overflow). SQLite takes one writer at a time; more connections only wait on its lock,
        in sleeps of up to 100 ms, so one connection serves a process best."""
        if self.is_sqlite:
            return (self.db_pool_size or 1, 0)
        return (self.db_pool_size or 4, self.db_max_overflow)

    @property
    def min_hold(self) -> int:
        return usd_to_micros(self.min_hold_usd)

    @property
    def hold_fallback_price(self) -> int:
        return usd_to_micros(self.hold_fallback_price_usd)

    @property
    def max_price_cap(self) -> int:
        return usd_to_micros(self.max_price_cap_usd)

    @property
    def min_payout(self) -> int:
        return usd_to_micros(self.min_payout_usd)

    @property
    def stripe_enabled(self) -> bool:
        return bool(self.stripe_api_key)

    @property
    def json_logs(self) -> bool:
        return self.redis_url is not None if self.log_format == "auto" else self.log_format == "json"

    @property
    def runs_periodic_tasks(self) -> bool:
        return self.redis_url is None if self.periodic_tasks is None else self.periodic_tasks

    @property
    def should_auto_migrate(self) -> bool:
        return self.is_sqlite if self.auto_migrate is None else self.auto_migrate

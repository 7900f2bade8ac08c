"""`POST /v1/fine_tuning/quotes`: what a job would cost, on which GPUs, before it is created."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from shared.weights import FORMATS, ExportFormat
from shared.schemas.common import Reply, Request
from shared.schemas.jobs import GpuName, Hyperparameters, LoraConfig, MethodCreate, Usd, VerificationMode, _six_places


class QuoteCreate(Request):
    """The job as it would be created (a training file), or just a token count to price."""

    model: str = Field(min_length=1, max_length=240, description="a base model, or your ft: model or checkpoint to "
                       "continue")
    training_file: str | None = Field(default=None, max_length=64)
    training_tokens: int | None = Field(default=None, ge=1, le=10**12, description="tokens per epoch, instead of a file")
    validation_file: str | None = Field(default=None, max_length=64)
    hyperparameters: Hyperparameters | None = None
    method: MethodCreate | None = None
    lora: LoraConfig | None = None
    max_price_per_gpu_hour: Usd | None = None
    max_cost: Usd | None = None
    min_vram_gb: int | None = Field(default=None, ge=1, le=1024)
    gpu_filter: Annotated[list[GpuName], Field(min_length=1, max_length=16)] | None = None
    trusted_hosts_only: bool = False
    verification: VerificationMode = Field(default="auto", description="as on the job: 'redundant' trains twice")
    export: Annotated[list[ExportFormat], Field(min_length=1, max_length=len(FORMATS))] | None = Field(
        default=None, description="as on the job: formats to export to when it succeeds, priced apart")

    _check_usd = field_validator("max_price_per_gpu_hour", "max_cost")(_six_places)

    @model_validator(mode="after")
    def _something_to_price(self) -> QuoteCreate:
        if (self.training_file is None) == (self.training_tokens is None):
            raise ValueError("give either training_file or training_tokens")
        return self


class ExportQuote(Reply):
    """What the exports asked for would take on top of the training: an export lease of its own."""

    formats: list[str]
    estimated_bytes: int = Field(description="the files' size in all")
    estimated_seconds: int
    estimated_memory_gb: float
    estimated_cost: str = Field(description="USD at the cheapest price a worker asks now (or the job's cap)")


class Offer(Reply):
    worker_id: str
    gpu_class: str
    gpu_name: str
    price_per_gpu_hour: str
    estimated_tokens_per_s: float
    estimated_seconds: int
    estimated_cost: str
    has_model_cached: bool


class GpuClassQuote(Reply):
    gpu_class: str
    label: str
    tier: str
    fits: bool = Field(description="the job's memory estimate fits this class's usual VRAM")
    estimated_tokens_per_s: float
    estimated_gpu_hours: float
    workers_available: int
    price_per_gpu_hour_min: str | None
    price_per_gpu_hour_max: str | None
    estimated_cost_min: str | None


class QuoteRead(Reply):
    object: Literal["fine_tuning.quote"] = "fine_tuning.quote"
    model: str
    n_epochs: int
    estimated_tokens: int
    estimated_memory_gb: float
    platform_fee_percent: float
    workers_available: int = Field(description="idle workers that could take this job now")
    max_price_per_gpu_hour: str = Field(description="the highest price per GPU-hour the job would pay, USD decimal "
                                        "string: the request's, or the market's default cap")
    max_price_source: Literal["customer", "market"]
    trainings: int = Field(description="how many times the job trains (2 with verification 'redundant', on two "
                           "providers); every estimated cost here covers all of them")
    cheapest: Offer | None
    fastest: Offer | None
    gpu_classes: list[GpuClassQuote]
    export: ExportQuote | None = None

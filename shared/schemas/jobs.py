"""Fine-tuning jobs, their events and checkpoints, in OpenAI's shapes plus marketplace fields."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    Field, SerializerFunctionWrapHandler, StringConstraints, field_validator, model_serializer, model_validator,
)

from shared.money import usd_to_micros
from shared.schemas.common import Page, Reply, Request
from shared.weights import FORMATS, ExportFormat

JobStatusName = Literal["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]
Auto = Literal["auto"]
ModuleName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.]{1,64}$")]
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]
GpuName = Annotated[str, StringConstraints(min_length=1, max_length=64, strip_whitespace=True)]
VerificationMode = Literal["auto", "always", "redundant"]
Usd = Annotated[Decimal, Field(gt=0, le=1_000_000)]


def _six_places(value: Decimal | None) -> Decimal | None:
    if value is not None:
        usd_to_micros(value)  # raises ValueError past six decimal places
    return value


class Hyperparameters(Request):
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100)] = "auto"
    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = "auto"


class SupervisedMethod(Request):
    hyperparameters: Hyperparameters | None = None


class DpoHyperparameters(Hyperparameters):
    beta: Auto | Annotated[float, Field(gt=0, le=2)] = "auto"


class DpoMethod(Request):
    hyperparameters: DpoHyperparameters | None = None


class MethodCreate(Request):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    # Accepted so the error can say "not supported" rather than "unknown field".
    reinforcement: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _settings_of_its_type(self) -> MethodCreate:
        for other in ("supervised", "dpo", "reinforcement"):
            if other != self.type and getattr(self, other) is not None:
                raise ValueError(f"method.{other} is given but method.type is {self.type!r}")
        return self


class EarlyStopping(Request):
    """Stop when validation loss has not improved for `patience` evaluations; the job keeps the best step."""

    patience: int = Field(ge=1, le=100)


class WandbSettings(Request):
    project: str = Field(min_length=1, max_length=128)
    name: str | None = Field(default=None, max_length=128)
    entity: str | None = Field(default=None, max_length=128)
    tags: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] | None = Field(default=None,
                                                                                           max_length=32)
    # Our extension: the key the coordinator logs with (W&B's own settings page holds it at OpenAI). Never returned.
    api_key: str | None = Field(default=None, min_length=1, max_length=256)


class Integration(Request):
    type: Literal["wandb"]
    wandb: WandbSettings


class LoraConfig(Request):
    r: int = Field(default=16, ge=1, le=256)
    alpha: int | None = Field(default=None, ge=1, le=1024, description="Default: 2 * r")
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | Annotated[list[ModuleName], Field(min_length=1, max_length=32)] = "all-linear"


class EvaluationCreate(Request):
    examples: int = Field(default=5, ge=1, le=20)


class EvaluationRead(Reply):
    examples: int
    base_batch_id: str | None = None
    tuned_batch_id: str | None = None


class JobCreate(Request):
    model: str = Field(min_length=1, max_length=240, description="a base model, or your ft: model or checkpoint to "
                       "continue")
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(default=None, max_length=64)
    hyperparameters: Hyperparameters | None = None
    method: MethodCreate | None = None
    suffix: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None
    seed: int | None = Field(default=None, ge=0, le=2_147_483_647)
    metadata: dict[MetadataKey, MetadataValue] | None = Field(default=None, max_length=16)
    integrations: Annotated[list[Integration], Field(max_length=1)] | None = None
    # Marketplace fields (sent with the openai client through `extra_body`).
    early_stopping: EarlyStopping | None = None
    lora: LoraConfig | None = None
    max_price_per_gpu_hour: Usd | None = Field(default=None, description="Highest worker price in USD per GPU-hour.")
    max_cost: Usd | None = Field(default=None, description="Stop the job at its last checkpoint past this total, USD.")
    min_vram_gb: int | None = Field(default=None, ge=1, le=1024)
    gpu_filter: Annotated[list[GpuName], Field(min_length=1, max_length=16)] | None = Field(
        default=None, description="GPU names to allow, matched as case-insensitive substrings (e.g. 'RTX 4090')."
    )
    trusted_hosts_only: bool = False
    evaluation: EvaluationCreate | None = Field(default=None, description="When the job succeeds, answer the first "
                                                "`examples` prompts of the validation file with the base and the "
                                                "fine-tune (two batches, billed like any), shown side by side on the "
                                                "job's dashboard page")
    export: Annotated[list[ExportFormat], Field(min_length=1, max_length=len(FORMATS))] | None = Field(
        default=None, description="Formats to export the fine-tune to when it succeeds (merged, gguf:f16, gguf:q8_0, "
        "gguf:q4_k_m), made on a worker and billed per second; see /v1/fine_tuning/jobs/{id}/exports")
    verification: VerificationMode = Field(
        default="auto", description="'always': a worker of another provider verifies the adapter before the job "
        "succeeds (at the platform's cost); 'redundant': the job trains twice, on two independent providers, each "
        "adapter is verified and their held-out losses compared (the customer pays both trainings, quoted up "
        "front; needs a training file of at least 20 examples); 'auto': the platform verifies a share of jobs "
        "and every job of a provider below its reliability threshold")

    _check_usd = field_validator("max_price_per_gpu_hour", "max_cost")(_six_places)

    @model_validator(mode="after")
    def _one_place_for_hyperparameters(self) -> JobCreate:
        method = self.method
        inner = method and ((method.supervised and method.supervised.hyperparameters)
                            or (method.dpo and method.dpo.hyperparameters))
        if inner and self.hyperparameters:
            raise ValueError(f"give hyperparameters either at the top level or in method.{method.type}, "  # type: ignore[union-attr]
                             "not both")
        return self


class JobError(Reply):
    code: str
    message: str
    param: str | None


class HyperparametersRead(Reply):
    batch_size: Auto | int | None
    learning_rate_multiplier: Auto | float
    n_epochs: Auto | int


class DpoHyperparametersRead(HyperparametersRead):
    beta: Auto | float


class SupervisedMethodRead(Reply):
    hyperparameters: HyperparametersRead


class DpoMethodRead(Reply):
    hyperparameters: DpoHyperparametersRead


class MethodRead(Reply):
    type: Literal["supervised", "dpo"] = "supervised"
    supervised: SupervisedMethodRead | None = None
    dpo: DpoMethodRead | None = None

    @model_serializer(mode="wrap")
    def _only_its_method(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """OpenAI's shape: the settings of the method used, and no null for the other."""
        return {k: v for k, v in handler(self).items() if v is not None}


class EarlyStoppingRead(Reply):
    patience: int
    best_step: int | None = Field(default=None, description="the step whose adapter the job returns")
    stopped_early: bool | None = Field(default=None, description="whether training ended before its last step")
    reason: str | None = None


class LoraRead(Reply):
    r: int
    alpha: int
    dropout: float
    target_modules: str | list[str]


class JobRead(Reply):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: HyperparametersRead
    model: str
    organization_id: str
    result_files: list[str]
    status: JobStatusName
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    integrations: list[Any] | None = None
    seed: int
    estimated_finish: int | None
    method: MethodRead
    metadata: dict[str, str] | None
    # Marketplace extensions.
    early_stopping: EarlyStoppingRead | None = None
    lora: LoraRead
    max_price_per_gpu_hour: str | None = Field(description="USD per GPU-hour, decimal string")
    max_price_source: Literal["customer", "market"] | None = Field(
        description="the customer's cap, or the market's default for a job that named none")
    max_cost: str | None = Field(description="USD, decimal string")
    min_vram_gb: int | None
    gpu_filter: list[str] | None
    trusted_hosts_only: bool
    estimated_tokens: int = Field(description="Training tokens estimated from the files and epochs")
    cost: str = Field(description="USD charged so far: ended leases plus the running one's time, decimal string")
    cost_held: str = Field(description="USD still held on the customer's balance for this job, decimal string")
    verified: bool = Field(description="a worker of another provider confirmed the adapter")
    export: list[str] | None = Field(default=None, description="the export formats asked for at creation")
    evaluation: EvaluationRead | None = Field(default=None, description="the evaluation asked for at creation, and "
                                              "its two batches once the job succeeded")
    verification: VerificationRead


class ReplicaRead(Reply):
    """One of a redundant job's trainings, as its verifiers measured it."""

    worker_id: str
    heldout_adapter_loss: float
    outcome: Literal["confirmed", "delivered", "settled", "refuted"] = Field(
        description="confirmed: verified, waiting for the other training; delivered: the adapter the job "
        "returns; settled: verified, agreed with the delivered one, paid; refuted: its held-out loss was "
        "worse than the other's beyond the tolerance, not billed nor paid")


class VerificationRead(Reply):
    """What independent verification found: a worker of another provider evaluated the adapter on a held-out
    sample its trainer never received."""

    mode: VerificationMode
    status: Literal["not_selected", "pending", "passed", "failed", "skipped", "unverified", "cancelled"]
    reason: str | None = None
    heldout_base_loss: float | None = None
    heldout_adapter_loss: float | None = None
    valid_adapter_loss: float | None = None
    reported_valid_loss: float | None = None
    held_out_examples: int = 0
    replicas: list[ReplicaRead] = Field(default_factory=list, description="with 'redundant': each training "
                                        "whose adapter a verifier confirmed, and what came of it")


class JobList(Page):
    data: list[JobRead]


class JobEventRead(Reply):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any]


class JobEventList(Page):
    data: list[JobEventRead]


class CheckpointRead(Reply):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, float]
    step_number: int
    # Marketplace extension: whether its weights are still kept, so a job can continue from it by name.
    available: bool = Field(default=True, description="its content is kept (not pruned or quarantined): a job can "
                            "start from it with model set to fine_tuned_model_checkpoint")


class CheckpointList(Page):
    data: list[CheckpointRead]
    first_id: str | None
    last_id: str | None

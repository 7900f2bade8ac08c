"""The wire protocol between the coordinator and the worker agent (under `/v1/workers`).

Requests (what the agent sends) are strict, replies (what it reads) are tolerant, so a newer
coordinator and an older agent keep working. The agent sends `Tunegrid-Protocol: <version>` on
every call and, on lease calls, `Tunegrid-Fencing-Token`; compatibility decisions live here.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator

from shared.jobspec import JobSpec
from shared.money import usd_to_micros
from shared.schemas.common import Reply, Request

PROTOCOL_VERSION = 1
SUPPORTED_PROTOCOL_VERSIONS = frozenset({1})
PROTOCOL_HEADER = "Tunegrid-Protocol"
FENCING_TOKEN_HEADER = "Tunegrid-Fencing-Token"
SHA256_HEADER = "Tunegrid-Sha256"
UPLOAD_KEY_HEADER = "Tunegrid-Upload-Key"  # an upload PUT to a presigned URL, for the coordinator to adopt
WORKER_TOKEN_SCHEME = "tgw"

Name = Annotated[str, StringConstraints(min_length=1, max_length=128, strip_whitespace=True)]
ShortText = Annotated[str, StringConstraints(max_length=2000)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
ComputeCapability = Annotated[str, StringConstraints(pattern=r"^\d{1,2}\.\d{1,2}$")]
ModelId = Annotated[str, StringConstraints(min_length=1, max_length=100)]
# Every count fits the database column it lands in (steps: 32-bit, tokens: 64-bit).
Step = Annotated[int, Field(ge=0, le=2**31 - 1)]
Tokens = Annotated[int, Field(ge=0, le=2**62)]
_DECIMAL = re.compile(r"[0-9]{1,4}")


def is_supported(version: str | None) -> bool:
    # fullmatch on ASCII digits: str.isdigit() also accepts '²', which int() then refuses.
    return version is not None and _DECIMAL.fullmatch(version) is not None and int(version) in SUPPORTED_PROTOCOL_VERSIONS


# --- registration ---------------------------------------------------------------------------------

class GpuInventory(Request):
    """One GPU as NVML reports it at registration."""

    uuid: Name
    index: int = Field(ge=0, le=63)
    name: Name
    memory_total_bytes: int = Field(ge=0, le=2**44)
    compute_capability: ComputeCapability
    power_limit_w: float | None = Field(default=None, ge=0, le=5000)


class CpuInventory(Request):
    """A machine without a usable NVIDIA GPU trains tiny models on its CPU (development, demos)."""

    cores: int = Field(ge=1, le=1024)
    memory_bytes: int = Field(ge=0, le=2**46)


class OwnerPolicy(Request):
    """What the PC's owner allows; the agent enforces it, the coordinator shows and respects it."""

    idle_grace_s: int = Field(default=180, ge=0, le=86_400)
    temperature_pause_c: int = Field(default=83, ge=30, le=110)
    temperature_resume_c: int = Field(default=75, ge=20, le=110)
    schedule: list[Annotated[str, StringConstraints(max_length=64)]] = Field(default_factory=list, max_length=32)
    power_cap_w: int | None = Field(default=None, ge=10, le=5000)
    shared_gpus: list[Name] | None = Field(default=None, max_length=64)


class WorkerRegister(Request):
    machine_id: Name
    name: Name | None = None
    agent_version: Name
    driver_version: Name | None = None
    cuda_version: Name | None = None
    gpus: list[GpuInventory] = Field(default_factory=list, max_length=16)
    cpu: CpuInventory | None = None
    ask_price_per_gpu_hour: Annotated[Decimal, Field(ge=0, le=1000)]
    policy: OwnerPolicy = OwnerPolicy()
    cached_models: list[ModelId] = Field(default_factory=list, max_length=256)

    @field_validator("ask_price_per_gpu_hour")
    @classmethod
    def _micros(cls, value: Decimal) -> Decimal:
        usd_to_micros(value)  # more than six decimal places is an error
        return value


class WorkerRegistered(Reply):
    object: Literal["worker"] = "worker"
    worker_id: str
    worker_token: str = Field(description="shown once; the coordinator keeps only its hash")
    protocol_version: int = PROTOCOL_VERSION
    heartbeat_interval_s: int
    claim_timeout_s: int


# --- heartbeat ------------------------------------------------------------------------------------

WorkerActivity = Literal["idle", "working", "paused_by_owner", "unavailable"]


class GpuTelemetry(Request):
    uuid: Name
    utilization_pct: float | None = Field(default=None, ge=0, le=100)
    memory_free_bytes: int | None = Field(default=None, ge=0, le=2**44)
    temperature_c: float | None = Field(default=None, ge=-50, le=200)
    power_w: float | None = Field(default=None, ge=0, le=5000)
    foreign_processes: int = Field(default=0, ge=0, le=10_000)


class WorkerHeartbeat(Request):
    activity: WorkerActivity
    pause_reason: ShortText | None = None
    gpus: list[GpuTelemetry] = Field(default_factory=list, max_length=16)
    lease_id: Name | None = None
    step: Step | None = None
    cached_models: list[ModelId] | None = Field(default=None, max_length=256)


CommandType = Literal["cancel", "pause", "lease_lost"]


class Command(Reply):
    type: str  # a CommandType; an older agent ignores types it does not know
    lease_id: str
    reason: str = ""


class HeartbeatReply(Reply):
    commands: list[Command] = Field(default_factory=list)
    heartbeat_interval_s: int


# --- claim ----------------------------------------------------------------------------------------

LeaseKindName = Literal["train", "verify", "export", "batch"]


class ClaimRequest(Request):
    wait_s: float = Field(default=25, ge=0, le=30, description="long-poll for up to this long")
    kinds: list[LeaseKindName] = Field(default_factory=lambda: ["train"], min_length=1, max_length=8,
                                       description="the lease kinds this agent runs")
    gpus: list[GpuTelemetry] = Field(default_factory=list, max_length=16)
    cached_models: list[ModelId] | None = Field(default=None, max_length=256)


class ResumeFrom(Reply):
    checkpoint_id: str
    step: int
    url: str
    sha256: str
    bytes: int


class Assignment(Reply):
    lease_id: str
    fencing_token: int
    job_id: str
    kind: str = Field(default="train", description="`train`; `verify`: evaluate another provider's adapter; `export`: "
                      "merge the job's adapter into its base and convert it; `batch`: answer a batch's chat "
                      "requests (an older agent that knows only training never claims other kinds: "
                      "ClaimRequest.kinds)")
    spec: JobSpec = Field(description="model_dir is relative to the agent's model cache; the agent makes it absolute")
    base_model_repo: str | None = Field(description="Hugging Face repository to download; None: built locally")
    gpu_uuid: str | None
    training_file_url: str | None = Field(description="None for an export lease, which trains nothing")
    training_file_sha256: str | None
    validation_file_url: str | None = None
    validation_file_sha256: str | None = None
    resume_from: ResumeFrom | None = None
    # A verification lease's inputs: the adapter under test and the held-out sample its trainer never received.
    adapter_url: str | None = None
    adapter_sha256: str | None = None
    held_out_url: str | None = None
    held_out_sha256: str | None = None
    # A batch lease's custom_ids already answered by earlier leases (JSONL); its requests are `training_file_url`.
    batch_done_url: str | None = None
    batch_done_sha256: str | None = None
    # A continued job's starting adapter: an archive from which only `initial_adapter_member` is unpacked.
    initial_adapter_url: str | None = None
    initial_adapter_sha256: str | None = None
    initial_adapter_member: Literal["adapter/adapter_model.safetensors", "resume/adapter_model.safetensors"] | None = None
    ask_price_per_gpu_hour: str = Field(description="USD the provider earns per GPU-hour of this lease")
    lease_ttl_s: int
    lease_grace_s: int
    heartbeat_interval_s: int


class ClaimReply(Reply):
    assignment: Assignment | None = None


# --- lease reports --------------------------------------------------------------------------------

EventType = Literal["progress", "eval", "log", "started", "checkpoint"]


Reward = Annotated[float, Field(ge=-1e6, le=1e6)]


class PreferenceMetrics(Request):
    """DPO's figures at a step (or, on an `eval` event, on the validation pairs): mean rewards of the preferred
    and non-preferred answers, their margin, and the share of pairs ranked right."""

    chosen_reward: Reward
    rejected_reward: Reward
    reward_margin: Reward
    reward_accuracy: float = Field(ge=0, le=1)


class LeaseEvent(Request):
    """One report from the trainer, relayed by the agent; `time` is the worker's clock, for display only."""

    type: EventType
    time: float | None = None
    step: Step | None = None
    total_steps: Step | None = None
    epoch: float | None = Field(default=None, ge=0, le=1e6)
    train_loss: float | None = Field(default=None, ge=0, le=1e6)
    eval_loss: float | None = Field(default=None, ge=0, le=1e6)
    tokens_per_s: float | None = Field(default=None, ge=0, le=1e9)
    trained_tokens: Tokens | None = None
    eta_s: float | None = Field(default=None, ge=0, le=1e8, description="the trainer's estimate of the time left")
    preference: PreferenceMetrics | None = None
    message: ShortText | None = None
    seq: int | None = Field(default=None, ge=1, le=2**62, description=(
        "the event's place in the lease's progress (rising within a lease): one the coordinator has already "
        "recorded, sent again by a restarted agent, is skipped"))


class LeaseEvents(Request):
    events: list[LeaseEvent] = Field(min_length=1, max_length=500)


class Usage(Request):
    """What the worker measured for the lease; the coordinator bills from its own clock and compares."""

    wall_seconds: float = Field(ge=0, le=10 * 86_400)
    gpu_seconds: float = Field(ge=0, le=10 * 86_400 * 16)
    energy_joules: float | None = Field(default=None, ge=0, le=1e12)


class TrainingResult(Request):
    steps: Step
    trained_tokens: Tokens
    final_train_loss: float | None = Field(default=None, ge=0, le=1e6)
    final_eval_loss: float | None = Field(default=None, ge=0, le=1e6)
    best_step: Step | None = Field(default=None, description="with early stopping: the step whose adapter this is")
    stopped_early: bool | None = None


class VerificationResult(Request):
    """A verifier's figures: mean token losses of the base and of the adapter under test on the held-out sample
    (which its trainer never received) and on the trainer's own validation rows, with the tokens each counted."""

    heldout_base_loss: float | None = Field(default=None, ge=0, le=1e6)
    heldout_adapter_loss: float | None = Field(default=None, ge=0, le=1e6)
    heldout_tokens: Tokens = 0
    valid_base_loss: float | None = Field(default=None, ge=0, le=1e6)
    valid_adapter_loss: float | None = Field(default=None, ge=0, le=1e6)
    valid_tokens: Tokens = 0


class ExportFigures(Request):
    """How one format of an export went on the worker (display only: the coordinator checks the uploads)."""

    seconds: float = Field(ge=0, le=10 * 86_400)
    bytes: int = Field(ge=0, le=2**50)


class LeaseComplete(Request):
    """A training lease sends its adapter's sha256 and result; a verification lease its figures; an export lease,
    whose formats are uploaded already, how each went."""

    adapter_sha256: Sha256 | None = None
    result: TrainingResult | None = None
    verification: VerificationResult | None = None
    export: dict[Annotated[str, StringConstraints(max_length=32)], ExportFigures] | None = Field(default=None,
                                                                                                max_length=8)
    usage: Usage


class LeaseFail(Request):
    """`bad_checkpoint`: the checkpoint the lease was handed to resume from failed its checks on this worker (the
    coordinator re-checks it: the uploader is at fault when it agrees, the reporter when it does not)."""

    kind: Literal["user_error", "worker_error", "bad_checkpoint"]
    message: Annotated[str, StringConstraints(min_length=1, max_length=2000)]
    usage: Usage


class LeasePreempted(Request):
    reason: Annotated[str, StringConstraints(min_length=1, max_length=2000)]
    checkpoint_step: Step | None = None
    usage: Usage


class LeaseReply(Reply):
    object: Literal["worker.lease"] = "worker.lease"
    lease_id: str
    fencing_token: int
    status: str
    job_status: str
    message: str = ""


class BatchPartReply(Reply):
    """What the coordinator recorded of a batch lease's part: answers new to it, answers it already had (dropped),
    and requests of the batch still unanswered."""

    lease_id: str
    recorded: int
    duplicates: int
    pending: int


class UploadTicketRequest(Request):
    """A direct upload asked for: what it is (the same kinds and query as the upload calls) and its exact size
    and sha256, which the presigned URL and the adoption hold it to."""

    kind: Literal["checkpoint", "adapter", "export", "batch"]
    bytes: int = Field(ge=0, le=2**40)
    sha256: str = Field(pattern="^[0-9a-f]{64}$")
    step: int | None = Field(default=None, ge=0, le=10**9)
    format: str | None = Field(default=None, pattern="^(merged|gguf:(f16|q8_0|q4_k_m))$")


class UploadTicket(Reply):
    """Where to PUT the bytes: `url` with `headers`, before `expires_at`; then the kind's upload call with
    `key` in the `Tunegrid-Upload-Key` header and no body. No `url`: the coordinator takes the bytes itself."""

    object: Literal["worker.upload_ticket"] = "worker.upload_ticket"
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    key: str | None = None
    expires_at: int | None = None


class UploadReply(Reply):
    lease_id: str
    kind: Literal["checkpoint", "adapter", "export"]
    format: str | None = None
    sha256: str
    bytes: int
    step: int | None = None

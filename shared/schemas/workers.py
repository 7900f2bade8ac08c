"""Workers as their provider (and an admin) sees them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from shared.schemas.common import Page, Reply


class WorkerRead(Reply):
    object: Literal["worker"] = "worker"
    id: str
    name: str
    machine_id: str
    state: str
    pause_reason: str | None
    gpu_class: str
    gpu_name: str
    vram_total_bytes: int
    vram_free_bytes: int
    compute_capability: str | None
    gpus: list[dict[str, Any]]
    ask_price_per_gpu_hour: str
    cached_models: list[str]
    trusted: bool
    reliability: float
    completed_leases: int
    lost_leases: int
    failed_checks: int
    preempted_leases: int
    preemption_strikes: int = Field(description="preemptions the preemption rule counted against the worker")
    unconfirmed_claims: int = Field(description="user errors it reported that no second provider's worker confirmed")
    agent_version: str
    created_at: int
    last_heartbeat_at: int | None
    suspended: bool
    revoked: bool


class WorkerList(Page):
    data: list[WorkerRead]

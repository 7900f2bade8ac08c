"""OpenAI's Batch API objects: a batch of `/v1/chat/completions` requests against a base or fine-tuned model, run
on the fleet (tunegrid's extension: `cost`, `cost_held`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from shared.schemas.common import Page, Reply, Request

BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                      "cancelled"]
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class ExpiresAfter(Request):
    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=30 * 86400)


class BatchCreate(Request):
    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: str = Field(min_length=1, max_length=64, description="/v1/chat/completions")
    completion_window: str = Field(min_length=1, max_length=16, description="24h")
    metadata: dict[MetadataKey, MetadataValue] | None = Field(default=None, max_length=16)
    output_expires_after: ExpiresAfter | None = None


class BatchErrorData(Reply):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(Reply):
    object: Literal["list"] = "list"
    data: list[BatchErrorData]


class BatchRequestCounts(Reply):
    total: int
    completed: int
    failed: int


class BatchUsage(Reply):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class BatchRead(Reply):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    usage: BatchUsage | None = None
    metadata: dict[str, Any] | None = None
    cost: str = Field(description="USD charged so far, decimal string")
    cost_held: str = Field(description="USD still held on the balance for this batch, decimal string")


class BatchList(Page):
    data: list[BatchRead]
    first_id: str | None = None
    last_id: str | None = None

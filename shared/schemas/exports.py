"""A fine-tune's exports (tunegrid's resource beside OpenAI's fine-tuning jobs): the adapter merged into its base,
and GGUF files for llama.cpp and Ollama with their Modelfiles, made on a provider's worker and billed like training."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

from pydantic import Field, field_validator

from shared.money import usd_to_micros
from shared.schemas.common import Page, Reply, Request
from shared.weights import FORMATS, ExportFormat

ExportStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ExportCreate(Request):
    formats: Annotated[list[ExportFormat], Field(min_length=1, max_length=len(FORMATS))] = Field(
        description="merged (16-bit safetensors with tokenizer and chat template), gguf:f16, gguf:q8_0, gguf:q4_k_m")
    checkpoint: str | None = Field(default=None, max_length=300, description="a checkpoint of the job (its id or "
                                   "fine_tuned_model_checkpoint name) to export instead of the final adapter")
    max_cost: Annotated[Decimal, Field(gt=0, le=1_000_000)] | None = Field(default=None, description="USD")

    @field_validator("max_cost")
    @classmethod
    def _six_places(cls, value: Decimal | None) -> Decimal | None:
        if value is not None:
            usd_to_micros(value)
        return value


class ExportFileRead(Reply):
    format: str = Field(description="merged, gguf:<type>, or modelfile:gguf:<type> (the Ollama Modelfile of that file)")
    file_id: str
    filename: str
    bytes: int


class ExportError(Reply):
    code: str
    message: str
    param: str | None = None


class ExportRead(Reply):
    id: str
    object: Literal["fine_tuning.job.export"] = "fine_tuning.job.export"
    fine_tuning_job_id: str
    model: str = Field(description="what is exported: the job's fine_tuned_model, or a checkpoint's name")
    created_at: int
    finished_at: int | None
    status: ExportStatus
    formats: list[str]
    files: list[ExportFileRead]
    error: ExportError | None
    cost: str = Field(description="USD charged so far, decimal string")
    cost_held: str = Field(description="USD still held on the balance for this export, decimal string")


class ExportList(Page):
    data: list[ExportRead]

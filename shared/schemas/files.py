"""Files: uploaded datasets and result files (adapters), in OpenAI's `file` shape."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.schemas.common import Page, Reply

FilePurpose = Literal["fine-tune", "fine-tune-results"]


class FileRead(Reply):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None = None
    filename: str
    purpose: FilePurpose
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = None
    # Marketplace extensions: what validation found, used for quotes.
    format: Literal["chat", "prompt_completion", "preference", "peft-lora"] | None = None  # peft-lora: a result adapter
    uses_tools: bool = Field(default=False, description="the examples define or call tools")
    examples: int | None = None
    estimated_tokens: int | None = None
    sha256: str


class FileList(Page):
    data: list[FileRead]
    first_id: str
    last_id: str


class FileDeleted(Reply):
    id: str
    object: Literal["file"] = "file"
    deleted: bool

"""Files: uploaded datasets and batch inputs, and result files (adapters, exports, batch outputs), in OpenAI's
`file` shape."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.schemas.common import Page, Reply

FilePurpose = Literal["fine-tune", "fine-tune-results", "batch", "batch_output"]


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
    # peft-lora: a result adapter; merged-safetensors, gguf, ollama-modelfile: an export's; batch: a batch's input
    format: Literal["chat", "prompt_completion", "preference", "peft-lora", "merged-safetensors", "gguf",
                    "ollama-modelfile", "batch", "batch-output", "batch-errors"] | None = None
    model: str | None = Field(default=None, description="a batch file's model (every request names it)")
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

"""Models: the base-model catalog and a customer's fine-tuned adapters, in OpenAI's `model` shape."""

from __future__ import annotations

from typing import Literal

from shared.schemas.common import Reply


class ModelRead(Reply):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # Marketplace extensions.
    kind: Literal["base", "fine-tuned"]
    base_model: str | None = None
    parameters: int | None = None
    max_seq_len: int | None = None
    license: str | None = None
    hf_repo: str | None = None


class ModelList(Reply):
    object: Literal["list"] = "list"
    data: list[ModelRead]

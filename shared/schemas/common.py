"""Shapes every resource shares: the error envelope and list pages."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator


def _reject_nul(value: Any) -> None:
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("text must not contain NUL characters")
    elif isinstance(value, dict):
        for key, item in value.items():
            _reject_nul(key)
            _reject_nul(item)
    elif isinstance(value, list):
        for item in value:
            _reject_nul(item)


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_nul_characters(cls, data: Any) -> Any:
        # NUL cannot be stored in PostgreSQL text and is never meaningful in our fields.
        _reject_nul(data)
        return data


class Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ErrorBody(Reply):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Reply):
    error: ErrorBody


class Page(Reply):
    object: Literal["list"] = "list"
    has_more: bool

"""Shapes every resource shares: the error envelope and list pages."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


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

"""Shapes every resource shares: the error envelope and list pages."""

from __future__ import annotations

from decimal import Decimal
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

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


def _types(annotation: Any) -> set[Any]:
    """The plain types an annotation admits (through Optional, unions, Annotated and Literal)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _types(get_args(annotation)[0])
    if origin in (Union, UnionType):
        return set().union(*(_types(a) for a in get_args(annotation)))
    if origin is Literal:
        return {type(v) for v in get_args(annotation)}
    return {origin or annotation}


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_nul_characters(cls, data: Any) -> Any:
        # NUL cannot be stored in PostgreSQL text and is never meaningful in our fields.
        _reject_nul(data)
        return data

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_numbers(cls, data: Any) -> Any:
        """JSON's types as the schema says: `true` is not the number 1, nor `"5"` the number 5 (lax parsing
        would accept both). Money fields, which take decimal strings on purpose, are Decimal and unaffected."""
        if not isinstance(data, dict):
            return data
        for name, value in data.items():
            field = cls.model_fields.get(name)
            if field is None or not isinstance(value, (bool, str)):
                continue
            types = _types(field.annotation)
            numeric = bool(types & {int, float}) and not types & {Any, Decimal}
            if isinstance(value, bool) and bool not in types and (numeric or str in types):
                raise ValueError(f"{name} must not be a boolean")
            if isinstance(value, str) and numeric and str not in types:
                raise ValueError(f"{name} must be a number, not a string")
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

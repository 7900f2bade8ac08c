"""The one place errors become HTTP: OpenAI's envelope for domain errors, validation errors, 404/405 and crashes."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm.exc import StaleDataError

from coordinator.api.deps import WorkerCaller
from shared.errors import Conflict, RateLimited, ServerError, TunegridError
from shared.protocol import WORKER_TOKEN_SCHEME
from shared.schemas.common import ErrorResponse

log = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid request", 401: "Missing or invalid API key", 403: "Not allowed for this key's role",
        404: "Not found", 409: "Conflicts with the resource's state", 413: "Request body too large",
        503: "The database was busy; retry after Retry-After seconds",
    }.items()
}


def envelope(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
             code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


_LOCATIONS = {"body", "query", "path", "header", "form", "cookie"}
# pydantic names the union member an error came from inside `loc`; those are not parameters.
_UNION_TAGS = re.compile(r"^(int|float|str|bool|dict|list|none|decimal|constrained-.*|.*\[.*)$")


def _param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in _LOCATIONS and not (isinstance(p, str) and _UNION_TAGS.match(p))]
    return ".".join(parts) or None


def _most_specific(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """For `"auto" | int` fields prefer the int's complaint ("<= 50") over "should be 'auto'"."""
    if not errors:
        return {}
    first_param = _param(tuple(errors[0].get("loc", ())))
    same = [e for e in errors
            if first_param is None or (_param(tuple(e.get("loc", ()))) or "").startswith(first_param)]
    return next((e for e in same if e.get("type") != "literal_error"), same[0])


def _validation_message(error: dict[str, Any], param: str | None) -> tuple[str, str]:
    kind = error.get("type", "")
    if kind == "json_invalid":
        return "We could not parse the JSON body of your request: it is not valid JSON.", "invalid_json"
    if kind == "missing":
        return f"Missing required parameter: {param!r}.", "missing_required_parameter"
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param!r}.", "unknown_parameter"
    message = str(error.get("msg", "invalid value"))
    if kind == "value_error":
        message = message.removeprefix("Value error, ")
    return (f"Invalid value for {param!r}: {message}." if param else f"Invalid request: {message}."), "invalid_value"


def _worker_caller_of(request: Request) -> WorkerCaller | None:
    """A worker route's token when the request was refused before any dependency ran (a body that is not JSON)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.startswith(f"{WORKER_TOKEN_SCHEME}_"):
        return None
    if not request.url.path.startswith("/v1/workers/"):
        return None
    return WorkerCaller(state=request.app.state, token=token, protocol_version=0)


async def _auth_error_first(request: Request) -> JSONResponse | None:
    """A request with a bad key (or the wrong role) is told so, not what else is wrong with it.

    Routes check the key in the same thread hop as their database work, so a request refused before that
    hop (body validation, form checks) has not had its key checked yet: check it now, on this error path.
    """
    caller = getattr(request.state, "caller", None) or _worker_caller_of(request)
    if caller is None:
        return None
    try:
        await caller.verify()
    except TunegridError as exc:
        return JSONResponse(exc.envelope(), status_code=exc.http_status)
    return None


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TunegridError)
    if exc.http_status >= 500:
        log.error("server error: %s", exc.message)
    elif exc.http_status not in (401, 403, 429) and (auth_error := await _auth_error_first(request)):
        return auth_error
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, RateLimited) else None
    return JSONResponse(exc.envelope(), status_code=exc.http_status, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    if auth_error := await _auth_error_first(request):
        return auth_error
    first = _most_specific(list(exc.errors()))
    param = _param(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        param = None
    message, code = _validation_message(first, param)
    return envelope(400, message, param=param, code=code)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = {404: "Unknown URL; see /docs for the API.", 405: "Method not allowed for this URL."}.get(
        exc.status_code, str(exc.detail)
    )
    return envelope(exc.status_code, message, code=codes.get(exc.status_code), headers=getattr(exc, "headers", None))


async def _concurrent_change(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(Conflict("The resource was changed by another request at the same time; retry.",
                                 code="concurrent_modification").envelope(), status_code=409)


# Transient database conflicts: the request did nothing (its transaction rolled back) and can be sent again.
_TRANSIENT_SQLSTATES = {"40P01", "40001", "55P03"}  # deadlock, serialization failure, lock not available
RETRY_AFTER_S = "1"


# A second live lease for a job: two placements raced where SKIP LOCKED is missing (SQLite); one lost, nothing changed.
_LOST_RACES = ("uq_leases_live_job_id", "UNIQUE constraint failed: leases.job_id")


async def _database_busy(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, (OperationalError, PoolTimeout, IntegrityError))
    original = getattr(exc, "orig", None)
    transient = (isinstance(exc, PoolTimeout) or getattr(original, "sqlstate", None) in _TRANSIENT_SQLSTATES
                 or "database is locked" in str(original) or any(race in str(original) for race in _LOST_RACES))
    if not transient:
        return await _crash(request, exc)
    first_line = str(original or exc).strip().splitlines()[0] if str(original or exc).strip() else ""
    log.warning("database busy on %s %s: %s sqlstate=%s: %s", request.method, request.url.path,
                exc.__class__.__name__, getattr(original, "sqlstate", None) or "-", first_line[:200])
    return envelope(503, "The database was busy with a conflicting change; nothing was done. Retry shortly.",
                    type="server_error", code="database_busy", headers={"Retry-After": RETRY_AFTER_S})


async def _crash(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(ServerError("The server had an error while processing your request.").envelope(), status_code=500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(TunegridError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(StaleDataError, _concurrent_change)  # a versioned row changed under us
    app.add_exception_handler(OperationalError, _database_busy)
    app.add_exception_handler(PoolTimeout, _database_busy)
    app.add_exception_handler(IntegrityError, _database_busy)
    app.add_exception_handler(Exception, _crash)

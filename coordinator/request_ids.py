"""Every request's id, from the edge of the app to every log line it causes: `x-request-id` on each response (the
`openai` client reads it into `request_id`), the id on each log record, and the logs themselves, one JSON object a
line in production and plain text embedded.

A client's own `x-request-id` is kept when it looks like an id (a proxy's, a retry's); anything else gets a fresh
`req_...`. The id lives in a context variable, which anyio carries into the worker threads that run the services,
so a service's log line names the request that caused it. One access line per request (method, route, status,
milliseconds, body bytes in and out) is logged here, inside the request's context, instead of uvicorn's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sys
import time
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator.metrics import REQUEST_SECONDS

HEADER = "x-request-id"
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")
current: ContextVar[str | None] = ContextVar("request_id", default=None)
access = logging.getLogger("tunegrid.access")


def new_id() -> str:
    return f"req_{secrets.token_hex(16)}"


class RequestIds:
    """Outermost ASGI middleware: the id is set before anything else runs (size limits, authentication, routes),
    so every answer carries it, refusals included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = next((v.decode("latin-1") for k, v in scope["headers"] if k == HEADER.encode()), "")
        request_id = offered if _CLIENT_ID.match(offered) else new_id()
        token = current.set(request_id)
        began = time.perf_counter()
        status, bytes_in, bytes_out = 500, 0, 0

        async def counted_receive() -> Message:
            nonlocal bytes_in
            message = await receive()
            if message["type"] == "http.request":
                bytes_in += len(message.get("body", b""))
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, bytes_out
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER.encode()]
                message = {**message, "headers": [*headers, (HEADER.encode(), request_id.encode())]}
            elif message["type"] == "http.response.body":
                bytes_out += len(message.get("body", b""))
            elif message["type"] == "http.response.pathsend":  # a file the server sends itself (FileResponse)
                bytes_out += _size(message.get("path"))
            await send(message)

        try:
            await self.app(scope, counted_receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", None)  # the template (/v1/files/{file_id}), never an id
            milliseconds = round((time.perf_counter() - began) * 1000, 1)
            REQUEST_SECONDS.labels(scope["method"], route or "unmatched", str(status)).observe(milliseconds / 1000)
            access.info("%s %s %d %.1f ms", scope["method"], route or scope["path"], status, milliseconds,
                        extra={"method": scope["method"], "route": route, "status": status,
                               "duration_ms": milliseconds, "bytes_in": bytes_in, "bytes_out": bytes_out})
            current.reset(token)


def _size(path: object) -> int:
    try:
        return os.stat(str(path)).st_size
    except OSError:
        return 0


class RequestIdFilter(logging.Filter):
    """Puts the current request's id (or "-") on every record a handler sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current.get() or "-"
        return True


_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "request_id"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, request_id, and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


OWN_LOGGERS = ("coordinator", "tunegrid", "shared", "uvicorn")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def configure_logging(*, json_lines: bool, level: str = "info") -> None:
    """The process's root handler: JSON lines or text, with request ids; idempotent (a second call replaces it)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "tunegrid", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.tunegrid = True  # type: ignore[attr-defined]
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    # Our loggers at the configured level; everything else at warnings. A root at INFO would make SQLAlchemy log
    # every statement (its engine logs at INFO when the level allows it): the soak's heartbeats went from 5 ms to
    # 2.5 s at p50 that way.
    root.setLevel(logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):  # uvicorn's own lines through the same handler, once
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True

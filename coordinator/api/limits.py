"""ASGI middleware that refuses requests before any route reads them: bodies over the limit (413), NUL bytes
in the URL (400; PostgreSQL text cannot hold them), and file uploads without a valid customer key (401/403:
FastAPI parses a multipart body before any dependency runs, so the key is checked here, before a byte of the
body is read or spooled), in OpenAI's envelope."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import AuthenticationFailed, InvalidRequest, PayloadTooLarge, TunegridError

MULTIPART_OVERHEAD = 64 * 1024  # boundaries and the purpose field around the file itself


HEARTBEAT_PATH = "/v1/workers/heartbeat"
HEARTBEAT_BYTES = 8 * 1024  # telemetry of a few GPUs; anything larger is not a heartbeat


class BodySizeLimit:
    def __init__(
        self, app: ASGIApp, *, upload_bytes: int, other_bytes: int, lease_upload_bytes: int,
        export_upload_bytes: int | None = None, upload_path: str = "/v1/files",
        lease_upload_prefix: str = "/v1/workers/leases/",
    ) -> None:
        self.export_upload_bytes = export_upload_bytes or lease_upload_bytes
        self.app = app
        self.upload_bytes = upload_bytes + MULTIPART_OVERHEAD
        self.other_bytes = other_bytes
        self.lease_upload_bytes = lease_upload_bytes
        self.upload_path = upload_path
        self.lease_upload_prefix = lease_upload_prefix

    def _limit(self, scope: Scope) -> int:
        path = scope["path"]
        if path.rstrip("/") == self.upload_path:
            return self.upload_bytes
        if scope["method"] == "PUT" and path.startswith(self.lease_upload_prefix):
            if "/exports/" in path:
                return self.export_upload_bytes  # merged models and GGUF files, streamed to storage
            return self.lease_upload_bytes  # checkpoints and adapters, streamed to storage
        if path == HEARTBEAT_PATH:
            return HEARTBEAT_BYTES
        return self.other_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
            await _reject(send, InvalidRequest("The URL contains a NUL character."))
            return
        limit = self._limit(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _reject(send, PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes."))
            return
        received = 0
        too_large = PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
        exceeded = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise too_large
            return message

        async def guarded_send(message: Message) -> None:
            # Body parsers catch what `receive` raises and answer 400; the client must still learn it was 413.
            if not exceeded:
                await send(message)
            elif message["type"] == "http.response.start":
                await _reject(send, too_large)

        await self.app(scope, counting_receive, guarded_send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _reject(send: Send, error: TunegridError) -> None:
    body: dict[str, Any] = error.envelope()
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": error.http_status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
        (b"connection", b"close"),
    ]})
    await send({"type": "http.response.body", "body": payload})


Authenticate = Callable[[str], Awaitable[None]]


class AuthenticateUploads:
    """`POST /v1/files`: the bearer key is checked (rate limit, then `authenticate`) before the body is read;
    a missing, wrong or wrong-role key is refused with the connection closed, nothing spooled."""

    def __init__(self, app: ASGIApp, *, authenticate: Authenticate, upload_path: str = "/v1/files") -> None:
        self.app, self.authenticate, self.upload_path = app, authenticate, upload_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/") == self.upload_path:
            key = _bearer(scope)
            try:
                if not key:
                    raise AuthenticationFailed(
                        "You didn't provide an API key. Send it in the Authorization header: "
                        "'Authorization: Bearer YOUR_KEY'.", code="missing_api_key")
                await self.authenticate(key)
            except TunegridError as exc:
                await _reject(send, exc)
                return
        await self.app(scope, receive, send)


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None

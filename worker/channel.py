"""The agent's one link to the coordinator: every call, its timeouts, retries and the fencing token.

Transport failures, 5xx, 429 and 503 are retried with exponential backoff and full jitter, a bounded number
of times, honouring Retry-After; then `CoordinatorUnreachable` tells the caller to keep what it has and try
later. `409 lease_lost` raises `LeaseLost` (stop that job now). Other 4xx raise `Rejected`: retrying an
invalid request cannot help.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, ContextManager

import httpx

from shared.protocol import (
    FENCING_TOKEN_HEADER, PROTOCOL_HEADER, PROTOCOL_VERSION, SHA256_HEADER, UPLOAD_KEY_HEADER, Assignment,
    ClaimReply, HeartbeatReply, LeaseReply, UploadTicket, WorkerRegister, WorkerRegistered,
)
from shared.digests import sha256_file
from worker.files import CHUNK
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)
RETRYABLE = frozenset({429, 500, 502, 503, 504})


class ChannelError(Exception):
    pass


class CoordinatorUnreachable(ChannelError):
    """No answer after every retry: keep the job running and the results on disk, and try again later."""


class LeaseLost(ChannelError):
    """The coordinator no longer knows this lease as current: stop its container at once."""


class Rejected(ChannelError):
    def __init__(self, status: int, message: str, code: str | None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code = status, code


def _error(response: httpx.Response) -> tuple[str, str | None]:
    try:
        body = response.json()["error"]
        return str(body.get("message")), body.get("code")
    except Exception:  # noqa: BLE001 - not our envelope (a proxy's page)
        return response.text[:200], None


class Channel:
    def __init__(self, url: str, token: str | None, settings: WorkerSettings, *,
                 transport: httpx.BaseTransport | None = None, store_transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        self._sleep = sleep
        headers = {PROTOCOL_HEADER: str(PROTOCOL_VERSION), "User-Agent": "tunegrid-worker"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(
            base_url=url.rstrip("/"), headers=headers, transport=transport,
            timeout=httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s),
        )
        # Presigned URLs of the object store: no credentials of ours ever go there.
        self._store = httpx.Client(headers={"User-Agent": "tunegrid-worker"}, transport=store_transport,
                                   timeout=httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s))

    def close(self) -> None:
        self._client.close()
        self._store.close()

    # --- the retry loop ---------------------------------------------------------------------------

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        if retry_after and retry_after.isdigit():
            return min(float(retry_after), self.settings.backoff_max_s)
        ceiling = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** attempt)
        return random.uniform(0, ceiling)  # full jitter: a fleet that lost the coordinator does not return in step

    def call(self, method: str, path: str, *, attempts: int | None = None, timeout: float | None = None,
             content: Callable[[], Any] | None = None, **kwargs: Any) -> httpx.Response:
        """The request, retried as the module says. `content` is a factory so a retried upload starts over."""
        tries = attempts or self.settings.max_attempts
        last = "no attempt"
        for attempt in range(tries):
            try:
                response = self._client.request(
                    method, path, content=content() if content else None,
                    timeout=httpx.Timeout(timeout, connect=self.settings.connect_timeout_s) if timeout else httpx.USE_CLIENT_DEFAULT,
                    **kwargs)
            except httpx.TransportError as exc:
                last = f"{exc.__class__.__name__}: {exc}"
                retry_after = None
            else:
                if response.status_code < 400:
                    return response
                message, code = _error(response)
                if response.status_code == 409 and code == "lease_lost":
                    raise LeaseLost(message)
                if response.status_code not in RETRYABLE:
                    raise Rejected(response.status_code, message, code)
                last, retry_after = f"{response.status_code} {message}", response.headers.get("Retry-After")
            if attempt + 1 < tries:
                delay = self._backoff(attempt, retry_after)
                log.info("%s %s failed (%s); retrying in %.1f s", method, path, last, delay)
                self._sleep(delay)
        raise CoordinatorUnreachable(f"{method} {path}: {last}")

    # --- the protocol -----------------------------------------------------------------------------

    def register(self, provider_key: str, registration: WorkerRegister) -> WorkerRegistered:
        response = self.call("POST", "/v1/workers/register", json=registration.model_dump(mode="json"),
                             headers={"Authorization": f"Bearer {provider_key}"})
        return WorkerRegistered.model_validate(response.json())

    def heartbeat(self, body: dict[str, Any]) -> HeartbeatReply:
        # One try: the next heartbeat comes soon anyway, and a stale one is worth nothing.
        return HeartbeatReply.model_validate(self.call("POST", "/v1/workers/heartbeat", json=body, attempts=1).json())

    def claim(self, body: dict[str, Any]) -> Assignment | None:
        wait = float(body.get("wait_s", 0))
        response = self.call("POST", "/v1/workers/claim", json=body, timeout=self.settings.read_timeout_s + wait,
                             attempts=1)
        return ClaimReply.model_validate(response.json()).assignment

    def _lease(self, lease_id: str, token: int) -> dict[str, str]:
        return {FENCING_TOKEN_HEADER: str(token)}

    def events(self, lease_id: str, token: int, events: list[dict[str, Any]]) -> LeaseReply:
        response = self.call("POST", f"/v1/workers/leases/{lease_id}/events", json={"events": events},
                             headers=self._lease(lease_id, token))
        return LeaseReply.model_validate(response.json())

    def download(self, url: str, lease_id: str, token: int, target: Path, sha256: str) -> Path:
        """Stream a lease input to `target`, checked against `sha256`; retried from the start when cut. A 307 from
        the coordinator sends the GET to the object store's presigned URL for that one object."""
        for attempt in range(self.settings.max_attempts):
            tmp = target.with_name(f".{target.name}.part")
            try:
                with self._client.stream("GET", url, headers=self._lease(lease_id, token)) as response:
                    if response.status_code in (302, 303, 307) and response.headers.get("Location"):
                        self._fetch(response.headers["Location"], tmp)
                    else:
                        self._check(response)
                        self._save(response, tmp)
                if sha256_file(tmp) != sha256:
                    raise httpx.TransportError(f"{url} arrived with the wrong sha256")
                tmp.replace(target)
                return target
            except httpx.TransportError as exc:
                tmp.unlink(missing_ok=True)
                if attempt + 1 == self.settings.max_attempts:
                    raise CoordinatorUnreachable(f"GET {url}: {exc}") from None
                self._sleep(self._backoff(attempt, None))
        raise AssertionError("unreachable")

    @staticmethod
    def _check(response: httpx.Response) -> None:
        """Nothing for a success; the exception for a refusal (a retryable one as a transport error)."""
        if response.status_code < 400:
            return
        response.read()
        message, code = _error(response)
        if code == "lease_lost":
            raise LeaseLost(message)
        if response.status_code not in RETRYABLE:
            raise Rejected(response.status_code, message, code)
        raise httpx.TransportError(f"{response.status_code} {message}")

    @staticmethod
    def _save(response: httpx.Response, tmp: Path, *, raw: bool = False) -> None:
        """`raw`: the bytes as they came, whatever Content-Encoding claims (the store serves blobs, never encodings)."""
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as f:
            for chunk in (response.iter_raw(CHUNK) if raw else response.iter_bytes(CHUNK)):
                f.write(chunk)

    def _fetch(self, location: str, tmp: Path) -> None:
        """A presigned GET. The store's refusals (an expired URL: 403) are retried from the coordinator's call."""
        with self._store.stream("GET", location) as response:
            if response.status_code >= 400:
                raise httpx.TransportError(f"the object store answered {response.status_code}")
            self._save(response, tmp, raw=True)

    def upload(self, lease_id: str, token: int, path: Path, *, kind: str, step: int | None = None,
               fmt: str | None = None, opener: Callable[[], ContextManager[IO[bytes]]] | None = None) -> dict[str, Any]:
        """Stream a checkpoint, the adapter, one format of an export (`fmt`) or a batch's answers with its sha256;
        the coordinator stores nothing unless it matches. With an object store the bytes go to a presigned URL
        and the coordinator adopts them (`POST .../uploads`, PUT, then the kind's call with the key). `opener`:
        how to open the bytes (a file of the job's folder, opened without following links), when not `path`."""
        def opened() -> ContextManager[IO[bytes]]:
            return opener() if opener is not None else path.open("rb")

        digest, size = hashlib.sha256(), 0
        with opened() as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)

        def body() -> Iterator[bytes]:
            with opened() as f:
                while chunk := f.read(CHUNK):
                    yield chunk

        kind = kind if kind in ("adapter", "export", "batch") else "checkpoint"
        lease = self._lease(lease_id, token)
        params = {"step": step} if step is not None else None
        url = f"/v1/workers/leases/{lease_id}/" + {"adapter": "adapter", "export": f"exports/{fmt}",
                                                   "batch": "batch_results"}.get(kind, "checkpoints")
        headers = {**lease, SHA256_HEADER: digest.hexdigest()}
        ticket = UploadTicket.model_validate(self.call(
            "POST", f"/v1/workers/leases/{lease_id}/uploads", headers=lease,
            json={"kind": kind, "bytes": size, "sha256": digest.hexdigest(), "step": step, "format": fmt}).json())
        if ticket.url and ticket.key:
            self._put_direct(ticket, body)
            response = self.call("PUT", url, params=params, headers={**headers, UPLOAD_KEY_HEADER: ticket.key},
                                 timeout=max(self.settings.read_timeout_s, 600))
            return response.json()
        response = self.call("PUT", url, content=body, params=params,
                             headers={**headers, "Content-Type": "application/octet-stream"},
                             timeout=max(self.settings.read_timeout_s, 600))
        return response.json()

    def _put_direct(self, ticket: UploadTicket, body: Callable[[], Iterator[bytes]]) -> None:
        """The bytes to the presigned URL, retried as coordinator calls are; `CoordinatorUnreachable` when the
        store never took them (the caller tries the whole upload again later, with a fresh URL)."""
        last = "no attempt"
        for attempt in range(self.settings.max_attempts):
            try:
                response = self._store.put(ticket.url or "", content=body(), headers=ticket.headers,
                                           timeout=httpx.Timeout(max(self.settings.read_timeout_s, 600),
                                                                 connect=self.settings.connect_timeout_s))
                if response.status_code < 300:
                    return
                last = f"{response.status_code} {response.text[:200]}"
                if response.status_code < 500 and response.status_code != 429:
                    break  # refused (an expired URL, a length that is not the one signed): a new ticket may do
            except httpx.TransportError as exc:
                last = f"{exc.__class__.__name__}: {exc}"
            if attempt + 1 < self.settings.max_attempts:
                self._sleep(self._backoff(attempt, None))
        raise CoordinatorUnreachable(f"PUT to the object store: {last}")

    def finish(self, lease_id: str, token: int, outcome: str, body: dict[str, Any]) -> LeaseReply:
        """`outcome`: complete, fail or preempted. Idempotent on the coordinator, so retrying is safe."""
        response = self.call("POST", f"/v1/workers/leases/{lease_id}/{outcome}", json=body,
                             headers=self._lease(lease_id, token))
        return LeaseReply.model_validate(response.json())

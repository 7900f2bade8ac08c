"""A small typed-enough client for the customer API: explicit timeouts, bounded retries on connection errors
and 503 (honouring Retry-After), and the OpenAI error envelope turned into `ApiError`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

RETRIES = 3
# (connect, read, write, pool) seconds: a plain tuple, which any httpx-compatible client takes (a test's transport too)
TIMEOUT = (5.0, 30.0, 30.0, 30.0)
UPLOAD_TIMEOUT = (5.0, 600.0, 600.0, 600.0)


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    def __str__(self) -> str:
        return f"{self.message} ({self.code or self.status})"


class Client:
    def __init__(self, base_url: str, api_key: str, *, transport: httpx.BaseTransport | None = None) -> None:
        if not api_key:
            raise ApiError(401, "No API key: set TUNEGRID_API_KEY (or pass --api-key).", "missing_api_key")
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=TIMEOUT, transport=transport,
                                 headers={"Authorization": f"Bearer {api_key}", "User-Agent": "tunegrid-cli"})

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(RETRIES + 1):
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt == RETRIES or method not in ("GET", "HEAD"):
                    raise ApiError(0, f"Cannot reach {self.http.base_url}: {exc.__class__.__name__}", "unreachable") from exc
                time.sleep(0.5 * 2**attempt)
                continue
            if response.status_code == 503 and attempt < RETRIES:
                time.sleep(min(float(response.headers.get("Retry-After") or 1), 10))
                continue
            if response.status_code >= 400:
                try:
                    error = response.json()["error"]
                    raise ApiError(response.status_code, error.get("message") or response.text, error.get("code"))
                except (ValueError, KeyError, TypeError):
                    raise ApiError(response.status_code, response.text[:500]) from None
            return response
        raise AssertionError("unreachable")

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, json=body or {}).json()

    # --- resources

    def upload(self, path: Path, purpose: str = "fine-tune") -> dict[str, Any]:
        with path.open("rb") as f:
            return self.request("POST", "/v1/files", data={"purpose": purpose}, timeout=UPLOAD_TIMEOUT,
                                files={"file": (path.name, f, "application/jsonl")}).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self.get(f"/v1/fine_tuning/jobs/{job_id}")

    def events(self, job_id: str, limit: int = 100) -> list[dict[str, Any]]:
        return self.get(f"/v1/fine_tuning/jobs/{job_id}/events", limit=limit)["data"]

    def download(self, file_id: str, target: Path) -> int:
        written = 0
        with self.http.stream("GET", f"/v1/files/{file_id}/content", timeout=UPLOAD_TIMEOUT) as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError(response.status_code, response.text[:500])
            partial = target.with_name(target.name + ".partial")
            with partial.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    written += len(chunk)
            partial.replace(target)
        return written

"""A blob as an HTTP answer: from the local disk, relayed from the object store, or a 307 to a presigned URL for
that one object, so the bytes go between the store and the caller instead of through this process."""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from coordinator.storage import CHUNK, BlobStore, DiskStore


def blob_response(store: BlobStore, key: str, *, media_type: str, headers: dict[str, str], expires_s: int,
                  redirect: bool = True, filename: str | None = None) -> Response:
    """`redirect` where the store can hand out a URL valid for `expires_s`; `filename` names the download there
    (the caller's `headers` carry it otherwise). FileNotFoundError when the blob is gone."""
    url = store.presigned_get(key, expires_s=expires_s, filename=filename) if redirect else None
    if url is not None:
        return RedirectResponse(url, status_code=307, headers=headers)
    if isinstance(store, DiskStore):
        path = store.path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        return FileResponse(path, media_type=media_type, headers=headers)
    size = store.size(key)
    if size is None:
        raise FileNotFoundError(key)
    return StreamingResponse(chunks(store.open(key)), media_type=media_type,
                             headers={**headers, "Content-Length": str(size)})


def chunks(handle: BinaryIO) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(CHUNK):
            yield chunk

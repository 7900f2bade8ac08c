"""A blob as an HTTP answer: a 307 to a presigned URL for that one object where the store hands one out, so the
bytes go between the store and the caller instead of through this process; the file itself from the local disk."""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from fastapi.responses import FileResponse, RedirectResponse, Response

from coordinator.storage import CHUNK, BlobStore, DiskStore


def blob_response(store: BlobStore, key: str, *, media_type: str, headers: dict[str, str], expires_s: int,
                  filename: str | None = None) -> Response:
    """A URL valid for `expires_s` (`filename` names the download there), or the disk's file. FileNotFoundError
    when the disk has no such blob."""
    url = store.presigned_get(key, expires_s=expires_s, filename=filename)
    if url is not None:
        return RedirectResponse(url, status_code=307, headers=headers)
    assert isinstance(store, DiskStore), "a store without presigned URLs is the disk"
    path = store.path(key)
    if not path.is_file():
        raise FileNotFoundError(key)
    return FileResponse(path, media_type=media_type, headers=headers)


def chunks(handle: BinaryIO) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(CHUNK):
            yield chunk

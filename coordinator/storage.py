"""Blob storage on the local disk: datasets, checkpoints and adapters, addressed by id and verified by sha256.

Writes go to a temporary file in the same directory and are renamed into place
only when complete, so a crash or a full disk never leaves half a blob behind.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import anyio.to_thread

from shared.errors import InsufficientStorage, InvalidFile, InvalidRequest, PayloadTooLarge

def _out_of_space(exc: OSError) -> InsufficientStorage | None:
    """A full disk (or quota) as the 507 the client can act on; any other OSError stays what it is."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage("The coordinator is out of disk space; nothing was stored. Retry later.")
    return None


_KEY = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_.-]+)*$")
CHUNK = 1024 * 1024


def checkpoint_key(checkpoint_id: str) -> str:
    """Where a job checkpoint's content is kept."""
    return f"checkpoints/{checkpoint_id}"


@dataclass(frozen=True, slots=True)
class StoredBlob:
    key: str
    bytes: int
    sha256: str


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        if not _KEY.match(key) or ".." in key.split("/"):
            raise ValueError(f"invalid blob key {key!r}")
        return self.root / key

    def put(self, key: str, source: BinaryIO, *, max_bytes: int | None = None) -> StoredBlob:
        """Stream `source` into the store; over `max_bytes` raises `PayloadTooLarge` and stores nothing."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            try:
                with os.fdopen(fd, "wb") as tmp:
                    while chunk := source.read(CHUNK):
                        size += len(chunk)
                        if max_bytes is not None and size > max_bytes:
                            raise PayloadTooLarge(f"The file is larger than the limit of {max_bytes} bytes.", param="file")
                        digest.update(chunk)
                        tmp.write(chunk)
                    tmp.flush()
                    os.fsync(tmp.fileno())
                os.replace(tmp_name, target)
            except OSError as exc:
                raise _out_of_space(exc) or exc from None
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return StoredBlob(key=key, bytes=size, sha256=digest.hexdigest())

    async def put_stream(
        self, key: str, chunks: AsyncIterator[bytes], *, max_bytes: int, expected_sha256: str | None = None,
    ) -> StoredBlob:
        """Stream an HTTP body into the store without holding it in memory. Over `max_bytes`, a sha256
        other than `expected_sha256`, a full disk or a dropped connection store nothing."""
        target = self.path(key)
        await anyio.to_thread.run_sync(lambda: target.parent.mkdir(parents=True, exist_ok=True))
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        tmp = os.fdopen(fd, "wb")
        digest, size, pending = hashlib.sha256(), 0, bytearray()
        try:
            try:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise PayloadTooLarge(f"The upload is larger than the limit of {max_bytes} bytes.")
                    digest.update(chunk)
                    pending += chunk
                    if len(pending) >= CHUNK:
                        data, pending = bytes(pending), bytearray()
                        await anyio.to_thread.run_sync(tmp.write, data)
                if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
                    raise InvalidRequest(
                        f"The upload's sha256 is {digest.hexdigest()}, not {expected_sha256} as declared; nothing was stored.",
                        param="Tunegrid-Sha256", code="sha256_mismatch")

                def finish() -> None:
                    tmp.write(pending)
                    tmp.flush()
                    os.fsync(tmp.fileno())
                    tmp.close()
                    os.replace(tmp_name, target)

                await anyio.to_thread.run_sync(finish)
            except OSError as exc:
                raise _out_of_space(exc) or exc from None
        except BaseException:
            tmp.close()
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return StoredBlob(key=key, bytes=size, sha256=digest.hexdigest())

    def link(self, source: str, target: str) -> None:
        """A second name for a blob (a hard link: no copy, and either name can be deleted alone)."""
        destination = self.path(target)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.link(self.path(source), destination)

    def sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        with self.open(key) as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def open(self, key: str) -> BinaryIO:
        return self.path(key).open("rb")

    def iter_lines(self, key: str, *, max_line: int | None = None) -> Iterator[bytes]:
        """The blob's lines; with `max_line`, a line longer than that raises `InvalidFile` before it is held whole
        (memory stays bounded whatever the upload)."""
        with self.open(key) as f:
            number = 0
            while True:
                line = f.readline(max_line + 1) if max_line is not None else f.readline()
                if not line:
                    return
                number += 1
                if max_line is not None and len(line) > max_line and not line.endswith(b"\n"):
                    raise InvalidFile(f"Line {number} is longer than {max_line} bytes.", param="file")
                yield line

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def stored(self, folder: str) -> Iterator[tuple[str, float, bool]]:
        """Every file under `folder` as (key, modified at, whether it is an upload still being written or one
        abandoned half way: `.incoming-*`); links and other non-files are not blobs and are skipped."""
        base = self.root / folder
        if not base.is_dir():
            return
        for path in base.rglob("*"):
            if path.is_file() and not path.is_symlink():
                key = path.relative_to(self.root).as_posix()
                yield key, path.stat().st_mtime, path.name.startswith(".incoming-")

    def remove_stored(self, key: str) -> None:
        """Delete a stored file by its key as `stored` gave it (an `.incoming-` one included)."""
        (self.root / key).unlink(missing_ok=True)

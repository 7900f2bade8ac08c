"""Blob storage: datasets, checkpoints, adapters and exports, addressed by key and verified by sha256.

`BlobStore` is what the services use; `DiskStore` (here) keeps blobs on the local disk, the embedded default, and
`coordinator.s3store.S3Store` in an S3-compatible object store shared by every coordinator host, which also hands
workers and customers presigned URLs so the bytes go around the API processes. `coordinator.stores.open_store`
picks one from the settings. Either way a blob appears whole or not at all: a crash, a full disk or a refused upload never leaves
half a blob under its key.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
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


def check_key(key: str) -> str:
    """`key` when it names a blob inside the store; ValueError for anything that could leave it."""
    if not _KEY.fullmatch(key) or ".." in key.split("/"):
        raise ValueError(f"invalid blob key {key!r}")
    return key


STAGING = "incoming"  # the folder where direct uploads (presigned PUT) wait to be checked and adopted


def staging_prefix(lease_id: str) -> str:
    """Where a lease's direct uploads land before the coordinator checks and adopts them."""
    return f"{STAGING}/{check_key(lease_id)}/"


def checkpoint_key(checkpoint_id: str) -> str:
    """Where a job checkpoint's content is kept."""
    return f"checkpoints/{checkpoint_id}"


@dataclass(frozen=True, slots=True)
class StoredBlob:
    key: str
    bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class PresignedPut:
    """A direct upload: PUT the bytes to `url` with `headers` before `expires_at` (epoch seconds); `key` names
    the staged object, which the coordinator checks and adopts when told."""

    key: str
    url: str
    headers: dict[str, str]
    expires_at: int


def sha256_mismatch(actual: str, expected: str) -> InvalidRequest:
    return InvalidRequest(f"The upload's sha256 is {actual}, not {expected} as declared; nothing was stored.",
                          param="Tunegrid-Sha256", code="sha256_mismatch")


def upload_missing() -> InvalidRequest:
    return InvalidRequest("Nothing was uploaded to that URL (or it was already used).", param="Tunegrid-Upload-Key",
                          code="upload_missing")


def too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The upload is larger than the limit of {max_bytes} bytes.")


async def receive(chunks: AsyncIterator[bytes], *, max_bytes: int, expected_sha256: str | None, piece: int,
                  write: Callable[[bytes], object]) -> tuple[int, str, bytes]:
    """An HTTP body, counted and hashed as it comes: each `piece` bytes handed to `write` (in a thread), the body
    bounded by `max_bytes` and held to `expected_sha256`. (size, sha256, the last bytes not yet written)."""
    digest, size, pending = hashlib.sha256(), 0, bytearray()
    async for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise too_large(max_bytes)
        digest.update(chunk)
        pending += chunk
        if len(pending) >= piece:
            data, pending = bytes(pending), bytearray()
            await anyio.to_thread.run_sync(write, data)
    if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
        raise sha256_mismatch(digest.hexdigest(), expected_sha256)
    return size, digest.hexdigest(), bytes(pending)


class BlobStore(ABC):
    """What the coordinator does with blobs, whichever backend holds them."""

    #: whether workers and customers can be sent to the store itself (presigned URLs)
    direct: bool = False

    @abstractmethod
    def put(self, key: str, source: BinaryIO, *, max_bytes: int | None = None) -> StoredBlob:
        """Stream `source` into the store; over `max_bytes` raises `PayloadTooLarge` and stores nothing."""

    @abstractmethod
    async def put_stream(
        self, key: str, chunks: AsyncIterator[bytes], *, max_bytes: int, expected_sha256: str | None = None,
    ) -> StoredBlob:
        """Stream an HTTP body into the store without holding it in memory. Over `max_bytes`, a sha256
        other than `expected_sha256`, a full store or a dropped connection store nothing."""

    @abstractmethod
    def copy(self, source: str, target: str) -> None:
        """A second name for a blob, without its bytes passing through here; either name can be deleted alone."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """The blob for reading (FileNotFoundError when there is none)."""

    @abstractmethod
    @contextmanager
    def local(self, key: str) -> Iterator[Path]:
        """The blob as a local file for checks that need one (safetensors, tar and GGUF readers), for the length
        of the block; a temporary copy where the store is remote. FileNotFoundError when there is none."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """The blob's length, or None when there is none."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Gone, if it was there."""

    @abstractmethod
    def stored(self, folder: str) -> Iterator[tuple[str, float, bool]]:
        """Every blob under `folder` as (key, modified at, whether it is an upload not (yet) whole or adopted)."""

    @abstractmethod
    def remove_stored(self, key: str) -> None:
        """Delete a stored blob by its key as `stored` gave it."""

    def abandoned_uploads(self, older_than_s: float) -> int:
        """Uploads begun over `older_than_s` ago that hold space without being blobs, cleared; how many. (On the
        disk those are `.incoming-*` files, which `stored` lists.)"""
        return 0

    def presigned_get(self, key: str, *, expires_s: int, filename: str | None = None) -> str | None:
        """A URL that serves this one blob until `expires_s` from now (as `filename` when given); None where the
        store cannot hand one out (the local disk)."""
        return None

    def presigned_put(self, key: str, *, expires_s: int, length: int, sha256: str) -> PresignedPut | None:
        """A URL that takes exactly `length` bytes for this one key until `expires_s` from now; None where the store
        cannot hand one out."""
        return None

    def adopt(self, staged: str, key: str, *, max_bytes: int, expected_sha256: str) -> StoredBlob:
        """A direct upload at `staged`, checked (size, sha256) and moved to `key`; refused uploads are deleted."""
        try:
            size = self.size(staged)
            if size is None:
                raise upload_missing()
            if size > max_bytes:
                raise too_large(max_bytes)
            digest = self.sha256(staged)
            if digest != expected_sha256:
                raise sha256_mismatch(digest, expected_sha256)
            self.copy(staged, key)
        finally:
            self.delete(staged)
        return StoredBlob(key=key, bytes=size, sha256=digest)

    def sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        with self.open(key) as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

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


class DiskStore(BlobStore):
    """Blobs as files under `root`. Writes go to a temporary file in the same directory and are renamed into place
    only when complete; a second name is a hard link."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, source: BinaryIO, *, max_bytes: int | None = None) -> StoredBlob:
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
        target = self.path(key)
        await anyio.to_thread.run_sync(lambda: target.parent.mkdir(parents=True, exist_ok=True))
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        tmp = os.fdopen(fd, "wb")
        try:
            try:
                size, digest, pending = await receive(chunks, max_bytes=max_bytes, expected_sha256=expected_sha256,
                                                      piece=CHUNK, write=tmp.write)

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
        return StoredBlob(key=key, bytes=size, sha256=digest)

    def copy(self, source: str, target: str) -> None:
        destination = self.path(target)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.link(self.path(source), destination)

    def open(self, key: str) -> BinaryIO:
        return self.path(key).open("rb")

    @contextmanager
    def local(self, key: str) -> Iterator[Path]:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        yield path

    def size(self, key: str) -> int | None:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def stored(self, folder: str) -> Iterator[tuple[str, float, bool]]:
        """Links and other non-files are not blobs and are skipped; `.incoming-*` files are uploads still being
        written or abandoned half way."""
        base = self.root / folder
        if not base.is_dir():
            return
        for path in base.rglob("*"):
            if path.is_file() and not path.is_symlink():
                key = path.relative_to(self.root).as_posix()
                yield key, path.stat().st_mtime, path.name.startswith(".incoming-")

    def remove_stored(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

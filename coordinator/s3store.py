"""Blobs in an S3-compatible object store (AWS S3, SeaweedFS, MinIO, R2), through the official AWS SDK.

Every coordinator host shares the bucket, so none needs a shared disk. Uploads the API receives are streamed in
parts (multipart above `PART_BYTES`) and completed only once whole and checked: a refused or dropped upload is
aborted and never appears under its key. Workers and customers get presigned URLs for one object each
(`presigned_get`, `presigned_put`): the bytes go between them and the store, around the API processes.
"""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

import anyio.to_thread
import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from coordinator.storage import (
    CHUNK, STAGING, BlobStore, PresignedPut, StoredBlob, check_key, receive, sha256_mismatch, too_large,
    upload_missing,
)
from shared.errors import InsufficientStorage, PayloadTooLarge

PART_BYTES = 8 * 1024 * 1024  # S3 takes parts of 5 MiB and up (the last one aside)
DIRECT_PUT_MAX = 5 * 1024**3  # the most one PUT can carry; larger uploads stream through the API (multipart)
MISSING = ("NoSuchKey", "404", "NotFound")


def _missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in MISSING


def _unavailable(exc: Exception) -> InsufficientStorage:
    return InsufficientStorage(f"The object store did not take the upload ({exc.__class__.__name__}); nothing was "
                               "stored. Retry later.")


class _Body(io.RawIOBase):
    """An object's streaming body as a raw file, so `io.BufferedReader` gives it `readline(limit)`."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._body.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        with suppress(Exception):
            self._body.close()
        super().close()


class _Writer:
    """One object being written: parts of `PART_BYTES` as a multipart upload, or a single PUT for a small one;
    `finish` makes it appear, `abort` leaves nothing."""

    def __init__(self, store: S3Store, key: str) -> None:
        self.store, self.key = store, key
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []

    def part(self, data: bytes) -> None:
        client, bucket, name = self.store.client, self.store.bucket, self.store.name(self.key)
        if self.upload_id is None:
            self.upload_id = client.create_multipart_upload(Bucket=bucket, Key=name)["UploadId"]
        number = len(self.parts) + 1
        reply = client.upload_part(Bucket=bucket, Key=name, UploadId=self.upload_id, PartNumber=number, Body=data)
        self.parts.append({"ETag": reply["ETag"], "PartNumber": number})

    def finish(self, last: bytes) -> None:
        client, bucket, name = self.store.client, self.store.bucket, self.store.name(self.key)
        if self.upload_id is None:
            client.put_object(Bucket=bucket, Key=name, Body=last)
            return
        if last:
            self.part(last)
        client.complete_multipart_upload(Bucket=bucket, Key=name, UploadId=self.upload_id,
                                         MultipartUpload={"Parts": self.parts})

    def abort(self) -> None:
        if self.upload_id is not None:
            with suppress(ClientError, BotoCoreError):
                self.store.client.abort_multipart_upload(Bucket=self.store.bucket, Key=self.store.name(self.key),
                                                         UploadId=self.upload_id)


class S3Store(BlobStore):
    direct = True

    def __init__(self, *, client: Any, presigner: Any, bucket: str, prefix: str = "",
                 tmp_dir: Path | None = None) -> None:
        self.client, self.presigner, self.bucket = client, presigner, bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.tmp_dir = tmp_dir

    @classmethod
    def from_url(cls, url: str, *, endpoint_url: str | None = None, public_endpoint_url: str | None = None,
                 region: str = "us-east-1", access_key_id: str | None = None,
                 secret_access_key: str | None = None) -> S3Store:
        """`s3://bucket[/prefix]`, with explicit timeouts and bounded retries; presigned URLs name
        `public_endpoint_url` (how workers and customers reach the store) when it differs."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        config = Config(signature_version="s3v4", s3={"addressing_style": "path"}, connect_timeout=5,
                        read_timeout=60, retries={"max_attempts": 3, "mode": "standard"}, max_pool_connections=32,
                        request_checksum_calculation="when_required", response_checksum_validation="when_required")
        session = boto3.session.Session(aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key,
                                        region_name=region)
        client = session.client("s3", endpoint_url=endpoint_url, config=config)
        presigner = client if not public_endpoint_url or public_endpoint_url == endpoint_url else \
            session.client("s3", endpoint_url=public_endpoint_url, config=config)
        return cls(client=client, presigner=presigner, bucket=bucket, prefix=prefix)

    def name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def create_bucket(self) -> None:
        """The bucket, made if it is not there yet (deployments and tests; production buckets are made once)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    # --- writing --------------------------------------------------------------------------------

    def put(self, key: str, source: BinaryIO, *, max_bytes: int | None = None) -> StoredBlob:
        writer, digest, size, pending = _Writer(self, key), hashlib.sha256(), 0, bytearray()
        try:
            while chunk := source.read(CHUNK):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise PayloadTooLarge(f"The file is larger than the limit of {max_bytes} bytes.", param="file")
                digest.update(chunk)
                pending += chunk
                if len(pending) >= PART_BYTES:
                    writer.part(bytes(pending))
                    pending = bytearray()
            writer.finish(bytes(pending))
        except (ClientError, BotoCoreError) as exc:
            writer.abort()
            raise _unavailable(exc) from None
        except BaseException:
            writer.abort()
            raise
        return StoredBlob(key=key, bytes=size, sha256=digest.hexdigest())

    async def put_stream(
        self, key: str, chunks: AsyncIterator[bytes], *, max_bytes: int, expected_sha256: str | None = None,
    ) -> StoredBlob:
        writer = _Writer(self, key)
        try:
            size, digest, pending = await receive(chunks, max_bytes=max_bytes, expected_sha256=expected_sha256,
                                                  piece=PART_BYTES, write=writer.part)
            await anyio.to_thread.run_sync(writer.finish, pending)
        except (ClientError, BotoCoreError) as exc:
            await anyio.to_thread.run_sync(writer.abort)
            raise _unavailable(exc) from None
        except BaseException:
            await anyio.to_thread.run_sync(writer.abort)
            raise
        return StoredBlob(key=key, bytes=size, sha256=digest)

    def copy(self, source: str, target: str) -> None:
        """A server-side copy (managed: multipart copy for objects past S3's 5 GB single-copy limit), with headers of
        ours only: a worker's PUT can carry unsigned ones (`Content-Encoding: gzip` would make every client that
        fetches the blob "decode" bytes that were never encoded), and those must not survive its adoption."""
        self.client.copy({"Bucket": self.bucket, "Key": self.name(source)}, self.bucket, self.name(target),
                         ExtraArgs={"MetadataDirective": "REPLACE", "ContentType": "application/octet-stream"})

    # --- reading --------------------------------------------------------------------------------

    def _get(self, key: str) -> Any:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.name(key))["Body"]
        except ClientError as exc:
            if _missing(exc):
                raise FileNotFoundError(key) from None
            raise

    def open(self, key: str) -> BinaryIO:
        return io.BufferedReader(_Body(self._get(key)), CHUNK)  # type: ignore[return-value]

    @contextmanager
    def local(self, key: str) -> Iterator[Path]:
        folder = Path(tempfile.mkdtemp(prefix="tunegrid-blob-", dir=self.tmp_dir))
        try:
            path = folder / "blob"
            with self.open(key) as source, path.open("wb") as target:
                shutil.copyfileobj(source, target, CHUNK)
            yield path
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def size(self, key: str) -> int | None:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self.name(key))["ContentLength"])
        except ClientError as exc:
            if _missing(exc):
                return None
            raise

    # --- lifetime -------------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.name(key))

    def stored(self, folder: str) -> Iterator[tuple[str, float, bool]]:
        """Direct uploads not yet adopted (`incoming/`) count as unfinished; a multipart upload never completed
        is not an object at all (`abandoned_uploads`)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + check_key(folder) + "/")
        for page in pages:
            for item in page.get("Contents", []):
                key = item["Key"].removeprefix(self.prefix)
                yield key, item["LastModified"].timestamp(), key.startswith(f"{STAGING}/")

    def remove_stored(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)

    def abandoned_uploads(self, older_than_s: float) -> int:
        """Abort multipart uploads begun over `older_than_s` ago and never completed (a coordinator that died
        mid-upload): their parts hold space without being objects. How many were aborted."""
        cutoff, aborted = time.time() - older_than_s, 0
        pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for upload in page.get("Uploads", []):
                if upload["Initiated"].timestamp() < cutoff:
                    with suppress(ClientError):
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                           UploadId=upload["UploadId"])
                        aborted += 1
        return aborted

    # --- direct transfers -----------------------------------------------------------------------

    def presigned_get(self, key: str, *, expires_s: int, filename: str | None = None) -> str | None:
        """Served as plain bytes whatever headers the object carries (`identity`: nothing to decode)."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self.name(key), "ResponseContentEncoding": "identity",
                                  "ResponseContentType": "application/octet-stream"}
        if filename is not None:
            params["ResponseContentDisposition"] = _attachment(filename)
        return str(self.presigner.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s))

    def presigned_put(self, key: str, *, expires_s: int, length: int, sha256: str) -> PresignedPut | None:
        """Signed with the object's length and sha256: a PUT of other bytes does not match the signature, or is
        refused by the store (BadDigest). Past what one PUT can take, None: the bytes go through the API."""
        if length > DIRECT_PUT_MAX:
            return None
        checksum = _checksum(sha256)
        url = self.presigner.generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": self.name(key), "ContentLength": length,
                                  "ChecksumSHA256": checksum}, ExpiresIn=expires_s)
        return PresignedPut(key=key, url=str(url), headers={"Content-Length": str(length),
                                                            "x-amz-checksum-sha256": checksum},
                            expires_at=int(time.time()) + expires_s)

    def adopt(self, staged: str, key: str, *, max_bytes: int, expected_sha256: str) -> StoredBlob:
        """A direct upload the store itself checked against the declared sha256 (the presigned PUT carried it) is
        adopted from its headers alone, a server-side copy, no byte read here. One whose checksum the store holds
        and that differs is refused unread; only a store that keeps no checksum has the bytes read and hashed.
        Adopting the same upload twice at once: the loser finds it gone (`upload_missing`), never a 500."""
        try:
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=self.name(staged), ChecksumMode="ENABLED")
            except ClientError as exc:
                if _missing(exc):
                    raise upload_missing() from None
                raise
            held = head.get("ChecksumSHA256")
            if held is None:
                return super().adopt(staged, key, max_bytes=max_bytes, expected_sha256=expected_sha256)
            size = int(head["ContentLength"])
            if held != _checksum(expected_sha256):
                raise sha256_mismatch(base64.b64decode(held).hex(), expected_sha256)
            if size > max_bytes:
                raise too_large(max_bytes)
            try:
                self.copy(staged, key)
            except ClientError as exc:
                if _missing(exc):
                    raise upload_missing() from None
                raise
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable(exc) from None
        finally:
            with suppress(ClientError, BotoCoreError):
                self.delete(staged)
        return StoredBlob(key=key, bytes=size, sha256=expected_sha256)


def _checksum(sha256: str) -> str:
    """S3's form of a sha256: base64 of the digest."""
    return base64.b64encode(bytes.fromhex(sha256)).decode()


def _attachment(filename: str) -> str:
    """A Content-Disposition for a stored name: ASCII letters, digits and `._-` only (the name is the customer's)."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in filename)[:200] or "download"
    return f'attachment; filename="{safe}"'

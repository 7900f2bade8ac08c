"""`coordinator/storage.py` and `coordinator/s3store.py`, the blob stores, each case on the local disk and on a real
S3 server (SeaweedFS): keys cannot leave the store, a blob is streamed in with its size and sha256 and appears
whole or not at all, an upload over its limit stores nothing, a second name costs no copy through here, lines are
read with a bound, and the periodic collector sees what is stored and how old it is. On S3 only: presigned URLs
are held to one object, one length, one sha256 and their expiry, and a direct upload is adopted without its
bytes passing through the coordinator."""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from coordinator import s3store
from coordinator.s3store import S3Store
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore, DiskStore
from coordinator.stores import open_store
from shared.errors import InvalidFile, InvalidRequest, PayloadTooLarge


@pytest.fixture(params=["disk", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "disk":
        return DiskStore(tmp_path)
    return request.getfixturevalue("s3")


@pytest.fixture
def s3(s3_config: dict[str, str], tmp_path: Path) -> S3Store:
    store = open_store(CoordinatorSettings(data_dir=tmp_path, **s3_config))  # type: ignore[arg-type]
    assert isinstance(store, S3Store)
    return store


@pytest.mark.parametrize("key", ["../etc/passwd", "files/../../x", "/abs", "files/a b", "", "files/x/.."])
def test_a_key_cannot_name_anything_outside_the_store(store: BlobStore, key: str) -> None:
    with pytest.raises(ValueError, match="invalid blob key"):
        store.put(key, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="invalid blob key"):
        store.open(key)


def test_a_blob_arrives_whole_with_its_size_and_sha256(store: BlobStore) -> None:
    data = b"x" * 300_000
    blob = store.put("files/file-1", io.BytesIO(data))
    assert (blob.bytes, blob.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert store.sha256("files/file-1") == blob.sha256 and store.size("files/file-1") == len(data)
    with store.local("files/file-1") as path:
        assert path.read_bytes() == data
    with store.open("files/file-1") as f:
        assert f.read() == data


def test_a_large_blob_goes_up_in_parts(store: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3store, "PART_BYTES", 5 * 1024 * 1024)  # S3's smallest part: a multipart upload at 11 MiB
    data = bytes(range(256)) * (11 * 4096)
    blob = store.put("files/big", io.BytesIO(data))
    assert blob.sha256 == hashlib.sha256(data).hexdigest() == store.sha256("files/big")


def test_over_its_limit_nothing_is_stored(store: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3store, "PART_BYTES", 5 * 1024 * 1024)
    with pytest.raises(PayloadTooLarge):
        store.put("files/file-2", io.BytesIO(b"y" * 2000), max_bytes=1000)
    with pytest.raises(PayloadTooLarge):  # past a part already sent: the multipart upload is aborted
        store.put("files/file-2", io.BytesIO(b"y" * (6 * 1024 * 1024)), max_bytes=5 * 1024 * 1024 + 10)
    assert store.size("files/file-2") is None
    assert [key for key, _, _ in store.stored("files")] == []  # not even a temporary file
    if isinstance(store, S3Store):
        assert store.abandoned_uploads(older_than_s=0) == 0  # nothing half-written is left either


def test_a_stream_with_the_wrong_sha256_stores_nothing(store: BlobStore) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"part one,"
        yield b"part two"

    async def put(expected: str) -> object:
        return await store.put_stream("adapters/l/u", body(), max_bytes=100, expected_sha256=expected)

    with pytest.raises(InvalidRequest) as refused:
        anyio.run(put, "0" * 64)
    assert refused.value.code == "sha256_mismatch" and store.size("adapters/l/u") is None
    good = hashlib.sha256(b"part one,part two").hexdigest()
    assert anyio.run(put, good).sha256 == good  # type: ignore[attr-defined]


def test_a_second_name_and_each_name_goes_alone(store: BlobStore) -> None:
    store.put("adapters/lease-1/upload-1", io.BytesIO(b"adapter"))
    store.copy("adapters/lease-1/upload-1", "files/file-3")
    if isinstance(store, DiskStore):  # a hard link on the disk, a server-side copy on S3
        assert store.path("files/file-3").stat().st_ino == store.path("adapters/lease-1/upload-1").stat().st_ino
    store.delete("adapters/lease-1/upload-1")
    store.delete("adapters/lease-1/upload-1")  # twice: nothing to do
    with store.open("files/file-3") as f:
        assert f.read() == b"adapter"
    with pytest.raises(FileNotFoundError):
        store.open("adapters/lease-1/upload-1")
    with pytest.raises(FileNotFoundError), store.local("adapters/lease-1/upload-1"):
        pass


def test_lines_are_read_with_a_bound_on_each(store: BlobStore) -> None:
    store.put("files/file-4", io.BytesIO(b"short\n" + b"z" * 5000 + b"\nafter\n"))
    lines = store.iter_lines("files/file-4", max_line=100)
    assert next(lines).rstrip(b"\n") == b"short"
    with pytest.raises(InvalidFile, match="Line 2"):
        next(lines)


def test_the_collector_sees_each_stored_blob_its_age_and_kind(store: BlobStore, tmp_path: Path) -> None:
    store.put("checkpoints/ftckpt-1", io.BytesIO(b"c"))
    if isinstance(store, DiskStore):
        (tmp_path / "checkpoints" / ".incoming-abandoned").write_bytes(b"half")
    else:
        store.put("incoming/lease-1/checkpoint-up-1", io.BytesIO(b"staged, never adopted"))
    seen = {key: partial for folder in ("checkpoints", "incoming") for key, age, partial in store.stored(folder)
            if abs(age - time.time()) < 300}
    assert seen.get("checkpoints/ftckpt-1") is False
    assert any(partial for partial in seen.values())  # the abandoned or unadopted upload is told apart
    for key in list(seen):
        store.remove_stored(key)
    assert list(store.stored("checkpoints")) == [] and list(store.stored("incoming")) == []


def test_the_disk_hands_out_no_urls(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    assert not store.direct and store.presigned_get("files/x", expires_s=60) is None
    assert store.presigned_put("incoming/l/x", expires_s=60, length=1, sha256="0" * 64) is None


# --- S3 only: presigned URLs ------------------------------------------------------------------------

def test_a_presigned_put_takes_only_its_object_its_length_and_its_bytes(s3: S3Store) -> None:
    data = b"checkpoint bytes" * 1000
    digest = hashlib.sha256(data).hexdigest()
    ticket = s3.presigned_put("incoming/lease-1/checkpoint-up-1", expires_s=60, length=len(data), sha256=digest)
    assert ticket is not None
    with httpx.Client(timeout=10) as http:
        other_bytes = bytes(len(data))
        assert http.put(ticket.url, content=other_bytes, headers=ticket.headers).status_code == 400  # BadDigest
        longer = http.put(ticket.url, content=data + b"!", headers={**ticket.headers,
                                                                     "Content-Length": str(len(data) + 1)})
        assert longer.status_code == 403  # the signature holds the length
        elsewhere = ticket.url.replace("checkpoint-up-1", "checkpoint-up-2")
        assert http.put(elsewhere, content=data, headers=ticket.headers).status_code == 403
        assert http.put(ticket.url, content=data, headers=ticket.headers).status_code == 200
    assert s3.size("incoming/lease-1/checkpoint-up-1") == len(data)
    assert s3.size("incoming/lease-1/checkpoint-up-2") is None


def test_a_presigned_url_expires(s3: S3Store) -> None:
    s3.put("files/file-5", io.BytesIO(b"five"))
    url = s3.presigned_get("files/file-5", expires_s=1, filename="report (final).jsonl")
    assert url is not None
    with httpx.Client(timeout=10) as http:
        response = http.get(url)
        assert response.content == b"five"
        assert response.headers["content-disposition"] == 'attachment; filename="report__final_.jsonl"'
        time.sleep(2.1)
        assert http.get(url).status_code == 403


def test_a_direct_upload_is_adopted_from_the_stores_own_checksum(s3: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"adapter" * 5000
    digest = hashlib.sha256(data).hexdigest()
    ticket = s3.presigned_put("incoming/lease-1/adapter-up-1", expires_s=60, length=len(data), sha256=digest)
    assert ticket is not None
    assert httpx.put(ticket.url, content=data, headers=ticket.headers, timeout=10).status_code == 200
    monkeypatch.setattr(S3Store, "open", lambda *_: pytest.fail("the adoption read the bytes"))
    blob = s3.adopt("incoming/lease-1/adapter-up-1", "adapters/lease-1/upload-1", max_bytes=len(data),
                    expected_sha256=digest)
    assert (blob.bytes, blob.sha256) == (len(data), digest)
    assert s3.size("incoming/lease-1/adapter-up-1") is None  # staged once, gone once adopted
    with pytest.raises(InvalidRequest) as again:
        s3.adopt("incoming/lease-1/adapter-up-1", "adapters/lease-1/upload-2", max_bytes=len(data),
                 expected_sha256=digest)
    assert again.value.code == "upload_missing"


def test_an_upload_the_store_did_not_check_is_read_and_refused_when_it_differs(s3: S3Store) -> None:
    s3.put("incoming/lease-1/adapter-up-3", io.BytesIO(b"not what was declared"))  # no checksum of the store's
    with pytest.raises(InvalidRequest) as refused:
        s3.adopt("incoming/lease-1/adapter-up-3", "adapters/lease-1/upload-3", max_bytes=1000,
                 expected_sha256=hashlib.sha256(b"something else").hexdigest())
    assert refused.value.code == "sha256_mismatch"
    assert s3.size("incoming/lease-1/adapter-up-3") is None and s3.size("adapters/lease-1/upload-3") is None
    s3.put("incoming/lease-1/adapter-up-4", io.BytesIO(b"x" * 2000))
    with pytest.raises(PayloadTooLarge):
        s3.adopt("incoming/lease-1/adapter-up-4", "adapters/lease-1/upload-4", max_bytes=1000,
                 expected_sha256=hashlib.sha256(b"x" * 2000).hexdigest())
    assert s3.size("adapters/lease-1/upload-4") is None


def test_past_what_one_put_can_carry_there_is_no_url(s3: S3Store) -> None:
    assert s3.presigned_put("incoming/l/export-up-1", expires_s=60, length=s3store.DIRECT_PUT_MAX + 1,
                            sha256="0" * 64) is None

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
from coordinator.storage import BlobStore, DiskStore, check_key
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


def test_headers_a_worker_slips_onto_its_put_do_not_survive_the_adoption(s3: S3Store) -> None:
    """The presigned PUT signs length, host and checksum; the store keeps unsigned headers such as Content-Encoding.
    Served as `gzip`, every client would "decode" a blob that was never encoded: another worker's resume, a
    verifier's adapter, a customer's download. Adopted blobs carry our headers only, and URLs serve plain bytes."""
    data = b"\x1f\x8b not really gzip, a checkpoint's bytes" * 100
    digest = hashlib.sha256(data).hexdigest()
    ticket = s3.presigned_put("incoming/lease-1/checkpoint-up-9", expires_s=60, length=len(data), sha256=digest)
    assert ticket is not None
    poisoned = {**ticket.headers, "Content-Encoding": "gzip", "Content-Type": "text/html",
                "Content-Disposition": "inline", "Cache-Control": "public, max-age=99999"}
    assert httpx.put(ticket.url, content=data, headers=poisoned, timeout=10).status_code == 200
    s3.adopt("incoming/lease-1/checkpoint-up-9", "checkpoints/ftckpt-9", max_bytes=len(data), expected_sha256=digest)
    head = s3.client.head_object(Bucket=s3.bucket, Key=s3.name("checkpoints/ftckpt-9"))
    assert head.get("ContentEncoding") in (None, "") and head["ContentType"] == "application/octet-stream"
    assert not head.get("ContentDisposition") and not head.get("CacheControl")
    s3.client.put_object(Bucket=s3.bucket, Key=s3.name("files/encoded"), Body=data, ContentEncoding="gzip")
    for key in ("checkpoints/ftckpt-9", "files/encoded"):  # an object that still claims an encoding: served plain
        fetched = httpx.get(s3.presigned_get(key, expires_s=60) or "", timeout=10)
        assert fetched.headers.get("content-encoding") in (None, "identity")
        assert hashlib.sha256(fetched.content).hexdigest() == digest


def test_one_upload_adopted_twice_at_once_is_never_a_500(s3: S3Store) -> None:
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    data = b"adapter" * 3000
    digest = hashlib.sha256(data).hexdigest()
    for round_ in range(3):
        staged = f"incoming/lease-1/adapter-up-r{round_}"
        ticket = s3.presigned_put(staged, expires_s=60, length=len(data), sha256=digest)
        assert ticket is not None and httpx.put(ticket.url, content=data, headers=ticket.headers).status_code == 200

        def adopt(i: int, staged: str = staged) -> str:
            try:
                s3.adopt(staged, f"adapters/lease-1/upload-{round_}-{i}", max_bytes=len(data), expected_sha256=digest)
                return "adopted"
            except InvalidRequest as exc:
                return str(exc.code)

        with ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(adopt, range(4)))
        assert "adopted" in outcomes and set(outcomes) <= {"adopted", "upload_missing"}, outcomes


def test_a_checksum_that_differs_is_refused_without_reading_the_upload(s3: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"x" * 4096
    ticket = s3.presigned_put("incoming/lease-1/export-up-1", expires_s=60, length=len(data),
                              sha256=hashlib.sha256(data).hexdigest())
    assert ticket is not None and httpx.put(ticket.url, content=data, headers=ticket.headers).status_code == 200
    monkeypatch.setattr(S3Store, "open", lambda *_: pytest.fail("read up to 5 GiB just to refuse it"))
    with pytest.raises(InvalidRequest) as refused:
        s3.adopt("incoming/lease-1/export-up-1", "exports/lease-1/up-1", max_bytes=10**6,
                 expected_sha256=hashlib.sha256(b"other").hexdigest())
    assert refused.value.code == "sha256_mismatch" and s3.size("incoming/lease-1/export-up-1") is None


def test_a_key_with_a_line_end_is_not_a_key() -> None:
    with pytest.raises(ValueError, match="invalid blob key"):
        check_key("incoming/lease-1/adapter-ok\n")


def test_a_relayed_upload_still_being_sent_is_not_abandoned_after_an_hour(s3: S3Store,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An upload past what one PUT takes streams through the API for as long as the provider's uplink needs."""
    from coordinator.services import blobs  # noqa: PLC0415

    started = s3.client.create_multipart_upload(Bucket=s3.bucket, Key=s3.name("exports/lease-1/up-big"))
    now = time.time()
    monkeypatch.setattr(s3store.time, "time", lambda: now + 2 * 3600)
    assert s3.abandoned_uploads(older_than_s=blobs.ABANDONED_UPLOAD_GRACE_S) == 0
    monkeypatch.setattr(s3store.time, "time", lambda: now + 25 * 3600)
    assert s3.abandoned_uploads(older_than_s=blobs.ABANDONED_UPLOAD_GRACE_S) == 1
    uploads = s3.client.list_multipart_uploads(Bucket=s3.bucket, Prefix=s3.prefix).get("Uploads", [])
    assert started["UploadId"] not in [u["UploadId"] for u in uploads]

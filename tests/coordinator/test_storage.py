"""`coordinator/storage.py`, the blob store: keys cannot leave the store, a blob is streamed in with its size and
sha256 and appears whole or not at all, an upload over its limit stores nothing, a second name costs no copy,
lines are read with a bound, and the periodic collector sees what is stored and how old it is."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from coordinator.storage import BlobStore
from shared.errors import InvalidFile, PayloadTooLarge


@pytest.mark.parametrize("key", ["../etc/passwd", "files/../../x", "/abs", "files/a b", "", "files/x/.."])
def test_a_key_cannot_name_anything_outside_the_store(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="invalid blob key"):
        BlobStore(tmp_path).path(key)


def test_a_blob_arrives_whole_with_its_size_and_sha256(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = b"x" * 300_000
    blob = store.put("files/file-1", io.BytesIO(data))
    assert (blob.bytes, blob.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert store.sha256("files/file-1") == blob.sha256 and store.path("files/file-1").read_bytes() == data


def test_over_its_limit_nothing_is_stored(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(PayloadTooLarge):
        store.put("files/file-2", io.BytesIO(b"y" * 2000), max_bytes=1000)
    assert [p.name for p in (tmp_path / "files").iterdir()] == []  # not even a temporary file


def test_a_second_name_is_a_link_and_each_name_goes_alone(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.put("adapters/lease-1/upload-1", io.BytesIO(b"adapter"))
    store.link("adapters/lease-1/upload-1", "files/file-3")
    assert store.path("files/file-3").stat().st_ino == store.path("adapters/lease-1/upload-1").stat().st_ino
    store.delete("adapters/lease-1/upload-1")
    store.delete("adapters/lease-1/upload-1")  # twice: nothing to do
    assert store.path("files/file-3").read_bytes() == b"adapter"


def test_lines_are_read_with_a_bound_on_each(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.put("files/file-4", io.BytesIO(b"short\n" + b"z" * 5000 + b"\nafter\n"))
    lines = store.iter_lines("files/file-4", max_line=100)
    assert next(lines).rstrip(b"\n") == b"short"
    with pytest.raises(InvalidFile, match="Line 2"):
        next(lines)


def test_the_collector_sees_each_stored_blob_its_age_and_kind(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.put("checkpoints/ftckpt-1", io.BytesIO(b"c"))
    (tmp_path / "checkpoints" / ".incoming-abandoned").write_bytes(b"half")
    seen = {key: partial for key, _age, partial in store.stored("checkpoints")}
    assert seen.get("checkpoints/ftckpt-1") is False
    assert any(partial for partial in seen.values())  # the abandoned upload is told apart
    for key in list(seen):
        store.remove_stored(key)
    assert list(store.stored("checkpoints")) == []

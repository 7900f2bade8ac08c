"""File service rules that HTTP clients cannot easily reach: filenames are cleaned, storage is atomic."""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from coordinator.db.tables import Role
from coordinator.services import files
from coordinator.services.keys import create_account
from coordinator.storage import DiskStore
from shared.errors import InvalidFile, InvalidRequest, PayloadTooLarge
from tests.conftest import chat_lines, jsonl


@pytest.mark.parametrize("filename,expected", [
    ("C:\\data\\train.jsonl", "train.jsonl"), ("../../etc/train.jsonl", "train.jsonl"), ("a\x00b.jsonl", None),
    ("bell\x07.jsonl", None), ("nel\x85.jsonl", None), ("..", None), ("", None), ("  ", None), ("x" * 256, None),
])
def test_filenames_are_reduced_to_a_safe_base_name(session: Session, tmp_path: Path, filename: str,
                                                   expected: str | None) -> None:
    account = create_account(session=session, name="a", role=Role.customer)
    upload = lambda: files.upload(  # noqa: E731
        session=session, store=DiskStore(tmp_path), account=account, filename=filename, purpose="fine-tune",
        source=io.BytesIO(jsonl(chat_lines())), max_bytes=10**6, min_examples=10, retention=timedelta(days=1),
    )
    if expected is None:
        with pytest.raises(InvalidRequest):
            upload()
    else:
        assert upload().filename == expected


def test_store_leaves_nothing_behind_when_a_blob_is_too_large(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    with pytest.raises(PayloadTooLarge):
        store.put("files/x", io.BytesIO(b"x" * 5000), max_bytes=4096)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    blob = store.put("files/y", io.BytesIO(b"hello"), max_bytes=4096)
    assert blob.bytes == 5 and blob.sha256.startswith("2cf24dba")
    with pytest.raises(ValueError):
        store.path("../escape")


def test_a_line_longer_than_an_example_can_be_is_refused_before_it_is_held_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(files, "MAX_LINE_BYTES", 4096)
    store = DiskStore(tmp_path)
    endless = jsonl(chat_lines()) + b'{"messages": "' + b"a" * 100_000  # no line end, ever
    with pytest.raises(InvalidFile, match="Line 13 is longer than 4096 bytes"):
        files.check_upload(store=store, purpose="fine-tune", source=io.BytesIO(endless), max_bytes=10**6, min_examples=10)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # nothing kept
    checked = files.check_upload(store=store, purpose="fine-tune", source=io.BytesIO(jsonl(chat_lines())),
                                 max_bytes=10**6, min_examples=10)
    assert checked.summary.examples == 12  # no session was needed to store and check it

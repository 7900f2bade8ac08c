"""A hostile customer's batch file against the coordinator's line checks (`shared/batches.py`, read as
`files.check_upload` reads it: through `BlobStore.iter_lines` with its line bound): every crafted file is a 400
naming its line (`InvalidFile`), promptly and in bounded memory, never an exception of another kind (a 500).
Attacks the coordinator mishandles are in tests/coordinator/services/test_batch_attacks.py."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.services.files import MAX_LINE_BYTES
from coordinator.storage import BlobStore, DiskStore
from shared.batches import MAX_REQUESTS, validate_batch_file
from shared.errors import InvalidFile


def line(custom_id: str = "a", **body: object) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "tunegrid/tiny-llama", "messages": [{"role": "user", "content": "hi"}], **body}}).encode()


def _stored(tmp_path: Path, data: bytes) -> Iterator[bytes]:
    store = DiskStore(tmp_path)
    store.put("files/f", io.BytesIO(data))
    return store.iter_lines("files/f", max_line=MAX_LINE_BYTES)


NESTED = (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": '
          b'"tunegrid/tiny-llama", "metadata": ' + b"[" * 200_000 + b"]" * 200_000 + b"}}")
HOSTILE = {
    "JSON nested 200,000 deep": (NESTED, "not valid JSON"),
    "content nested in parts": (line(messages=[{"role": "user", "content": [[[{"type": "text", "text": "x"}]]]}]),
                                "text part"),
    "not UTF-8": (line().replace(b'"hi"', b'"h\xffi"'), "not valid UTF-8"),
    "UTF-16 with its BOM": ("\ufeff".encode("utf-16-le") + line().decode().encode("utf-16-le"), "Line 2"),
    "a custom_id of 513 characters": (line("x" * 513), "custom_id of 1 to 512"),
    "a custom_id with a newline escape": (line("a\nb"), "printable ASCII"),
    "a custom_id that is a number": (line().replace(b'"custom_id": "a"', b'"custom_id": 7'), "custom_id"),
    "a lone surrogate": (line(messages=[{"role": "user", "content": "\ud800"}]), "surrogate"),
    "a line past the line limit": (line(messages=[{"role": "user", "content": "x" * (MAX_LINE_BYTES + 1)}]),
                                   "longer than"),
}


@pytest.mark.parametrize("raw, match", list(HOSTILE.values()), ids=list(HOSTILE))
def test_a_hostile_line_is_a_400_naming_it(tmp_path: Path, raw: bytes, match: str) -> None:
    with pytest.raises(InvalidFile, match=match):
        validate_batch_file(_stored(tmp_path, line("ok") + b"\n" + raw + b"\n"))


def test_a_windows_file_with_a_bom_and_crlf_is_read_as_its_requests(tmp_path: Path) -> None:
    data = b"\xef\xbb\xbf" + b"\r\n".join([line("a"), line("b"), b"", line("c")]) + b"\r\n"
    summary = validate_batch_file(_stored(tmp_path, data))
    assert (summary.requests, summary.model) == (3, "tunegrid/tiny-llama")


def test_more_requests_than_openai_allows_are_refused() -> None:
    def lines() -> Iterator[bytes]:
        for i in range(MAX_REQUESTS + 1):
            yield line(f"r{i}")

    with pytest.raises(InvalidFile, match=f"more than {MAX_REQUESTS} requests"):
        validate_batch_file(lines())

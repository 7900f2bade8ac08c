"""`services/held_out.py`: how many examples a job keeps back, and that the split copies every line once, byte
for byte, into what trainers get or the held-out sample (a BOM and a missing last newline included)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from coordinator.services import files, held_out
from coordinator.storage import DiskStore
from tests.conftest import chat_lines


@pytest.mark.parametrize(("examples", "kept"), [(10, 0), (19, 0), (20, 2), (100, 5), (2000, 64)])
def test_the_share_kept_back(examples: int, kept: int) -> None:
    assert held_out.kept_back(examples) == kept


def test_the_split_copies_every_line_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = DiskStore(tmp_path)
    lines = [line.encode() for line in chat_lines(40)]
    raw = b"\xef\xbb\xbf" + b"\n".join(lines[:20]) + b"\n\n" + b"\n".join(lines[20:])  # a BOM, a blank line, no last \n
    store.put(files.blob_key("file-x"), io.BytesIO(raw))
    job = SimpleNamespace(id="ftjob-x", held_out=None)
    record = held_out.keep_back(store=store, job=job, training=SimpleNamespace(id="file-x", examples=40, sha256="s"))  # type: ignore[arg-type]
    assert record is not None and (record["examples"], record["training_examples"]) == (2, 38)
    shipped = store.path(held_out.training_key("ftjob-x")).read_bytes().splitlines()
    held = store.path(held_out.held_out_key("ftjob-x")).read_bytes().splitlines()
    assert sorted(shipped + held) == sorted(lines) and len(held) == 2
    assert store.sha256(held_out.held_out_key("ftjob-x")) == record["sha256"]
    job.held_out = record
    assert held_out.training_input(job, SimpleNamespace(id="file-x", sha256="s")).key == held_out.training_key("ftjob-x")  # type: ignore[arg-type]
    again = held_out.keep_back(store=store, job=job, training=SimpleNamespace(id="file-x", examples=40, sha256="s"))  # type: ignore[arg-type]
    assert again is not None and again["sha256"] == record["sha256"]  # the same examples, seeded by the job's id

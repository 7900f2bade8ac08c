"""The job folder as hostile territory (worker/jobdir.py): what the trainer leaves in `work/` is read only as
regular files reached without links; a planted link, fifo or oversized file is refused and no host file is
read through one; the agent's own files are never written through a link."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from shared.checkpoint import MEMBERS
from worker.jobdir import (
    ProgressReader, UnsafeJobFile, checkpoint_parts, copy_out, create_private, pack_checkpoint, read_regular,
)
from worker.progress import ProgressTail, lease_event

SECRET = b"the owner's private key"


@pytest.fixture
def host_secret(tmp_path: Path) -> Path:
    secret = tmp_path / "home" / "id_ed25519"
    secret.parent.mkdir()
    secret.write_bytes(SECRET)
    return secret


@pytest.fixture
def work(tmp_path: Path) -> Path:
    folder = tmp_path / "lease" / "work"
    (folder / "out" / "checkpoints").mkdir(parents=True)
    return folder


def _checkpoint(work: Path, step: int) -> Path:
    folder = work.joinpath(*checkpoint_parts(step))
    folder.mkdir()
    for name in MEMBERS:
        (folder / name).write_bytes(name.encode())
    return folder


def test_a_checkpoint_is_packed_from_its_allowed_files_only(work: Path, tmp_path: Path) -> None:
    folder = _checkpoint(work, 4)
    (folder / "notes.txt").write_text("left behind")
    archive = pack_checkpoint(work, 4, tmp_path / "lease" / "checkpoint-4.tar.gz")
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == sorted(["resume", *[f"resume/{n}" for n in MEMBERS]])
        assert all(m.isfile() or m.name == "resume" for m in tar)


@pytest.mark.parametrize("plant", ["member", "folder", "checkpoints", "out"])
def test_a_planted_link_anywhere_on_the_way_is_refused(plant: str, work: Path, tmp_path: Path, host_secret: Path) -> None:
    folder = _checkpoint(work, 2)
    if plant == "member":
        (folder / "state.json").unlink()
        (folder / "state.json").symlink_to(host_secret)
    else:
        decoy = tmp_path / "decoy"
        decoy.mkdir()
        target = {"folder": folder, "checkpoints": folder.parent, "out": folder.parent.parent}[plant]
        os.rename(target, decoy / target.name)
        target.symlink_to(decoy / target.name)
    archive = tmp_path / "lease" / "checkpoint-2.tar.gz"
    with pytest.raises(UnsafeJobFile):
        pack_checkpoint(work, 2, archive)
    assert not archive.exists() or SECRET not in archive.read_bytes()


def test_files_the_trainer_leaves_are_read_only_when_regular(work: Path, tmp_path: Path, host_secret: Path) -> None:
    out = work / "out"
    (out / "result.json").symlink_to(host_secret)
    with pytest.raises(UnsafeJobFile):
        read_regular(work, "out", "result.json", limit=1024)
    os.mkfifo(out / "adapter.tar.gz")  # opening it would block the agent forever
    with pytest.raises(UnsafeJobFile, match="not a regular file"):
        copy_out(work, ("out", "adapter.tar.gz"), tmp_path / "lease" / "adapter.tar.gz", limit=1024)
    (out / "big").write_bytes(b"x" * 2048)
    with pytest.raises(UnsafeJobFile, match="more than"):
        read_regular(work, "out", "big", limit=1024)
    assert read_regular(work, "out", "missing", limit=1024) is None


def test_the_agent_never_writes_through_a_planted_link(tmp_path: Path, host_secret: Path) -> None:
    planted = tmp_path / "work.log"
    planted.symlink_to(host_secret)
    for options in ({}, {"truncate": True}, {"append": True}):
        with pytest.raises(OSError):
            create_private(planted, **options).close()
    assert host_secret.read_bytes() == SECRET


def test_progress_is_read_without_links_in_bounded_pieces(work: Path, host_secret: Path) -> None:
    progress = work / "out" / "progress.jsonl"
    progress.write_bytes(b'{"type": "step", "step": 1, "loss": 2.0}\n' + b"y" * 200 + b"\n" + b'{"type": "step", "step": 2')
    reader = ProgressReader(work, max_line=100)
    assert len(reader.read()) == 1  # the over-long line is skipped, the torn last line waits
    with progress.open("ab") as f:
        f.write(b', "loss": 1.5}\n')
    line = b'{"type": "step", "step": 2, "loss": 1.5}'
    assert reader.read() == [(progress.stat().st_size, line)]  # each line with the offset just past it
    progress.unlink()
    progress.symlink_to(host_secret)
    with pytest.raises(UnsafeJobFile):
        ProgressTail(work).read()


def test_a_line_the_protocol_would_refuse_is_dropped_not_sent() -> None:
    assert lease_event({"type": "step", "step": "/etc/passwd", "loss": 1.0}) is None
    assert lease_event({"type": "checkpoint", "step": 10**12}) is None
    assert lease_event({"type": "step", "step": 3, "loss": 1.0}) == {"type": "progress", "step": 3, "train_loss": 1.0}
    with pytest.raises(UnsafeJobFile):
        checkpoint_parts("../../etc")  # type: ignore[arg-type]


def test_a_huge_progress_file_without_newlines_does_not_fill_memory(work: Path) -> None:
    (work / "out" / "progress.jsonl").write_bytes(b"z" * (9 * 1024 * 1024))
    reader = ProgressReader(work)
    for _ in range(3):
        assert reader.read() == []
    assert reader.offset == 8 * 1024 * 1024  # whole reads without a line end are skipped; the rest may still end

"""A job's folder on the provider's PC, treated as hostile territory.

`<jobs_dir>/<lease id>/` belongs to the agent (mode 0700); the trainer (in its container) sees and writes only
its `work/` subfolder. Everything the agent reads from `work/` may have been planted by the job: so the agent
never takes a path from the trainer's files, derives each one from what it knows (a step number, a fixed name),
walks it one component at a time without following a link (`O_NOFOLLOW`), reads only regular files of bounded
size, and copies what it uploads into its own part of the folder first. Its own files (the trainer's log, the
archives it packs, what it downloads) live beside `work/`, where the trainer cannot plant anything.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from shared import checkpoint as fmt

WORK = "work"  # the trainer's side: /job in its container
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
DIRECTORY = getattr(os, "O_DIRECTORY", 0)
BINARY = getattr(os, "O_BINARY", 0)
CHUNK = 1 << 20


class UnsafeJobFile(Exception):
    """A file the trainer left is a link, not a regular file, outside its folder, or too large."""


def checkpoint_parts(step: int) -> tuple[str, ...]:
    """Where the trainer writes the checkpoint of `step`, from the step alone (never from a progress line)."""
    if type(step) is not int or not 0 < step < 2**31:
        raise UnsafeJobFile(f"not a step number: {step!r}")
    return ("out", "checkpoints", f"step-{step}")


def _open_folder(root: Path, parts: tuple[str, ...]) -> int:
    """A descriptor of root/parts..., every component a real folder (never a link)."""
    fd = os.open(root, os.O_RDONLY | DIRECTORY | NOFOLLOW)
    try:
        for part in parts:
            if part in ("", ".", "..") or "/" in part or "\\" in part:
                raise UnsafeJobFile(f"unsafe path component {part!r}")
            try:
                child = os.open(part, os.O_RDONLY | DIRECTORY | NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                raise
            except OSError as exc:  # ELOOP / ENOTDIR: a link or a file where a folder should be
                raise UnsafeJobFile(f"{'/'.join(parts)}: {part} is not a folder ({exc.strerror})") from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def open_regular(root: Path, *parts: str, limit: int) -> Iterator[tuple[IO[bytes], int]]:
    """root/parts as a regular file opened for reading (no link anywhere on the way), at most `limit` bytes:
    (file, size). FileNotFoundError when it is not there."""
    folder = _open_folder(root, tuple(parts[:-1]))
    try:
        try:
            fd = os.open(parts[-1], os.O_RDONLY | NOFOLLOW | BINARY | getattr(os, "O_NONBLOCK", 0), dir_fd=folder)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise UnsafeJobFile(f"{'/'.join(parts)} cannot be opened safely ({exc.strerror})") from None
    finally:
        os.close(folder)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # a fifo or a device would block or read the host's hardware
        os.close(fd)
        raise UnsafeJobFile(f"{'/'.join(parts)} is not a regular file")
    if info.st_size > limit:
        os.close(fd)
        raise UnsafeJobFile(f"{'/'.join(parts)} is {info.st_size} bytes, more than the {limit} allowed")
    with os.fdopen(fd, "rb") as f:
        yield f, info.st_size


def read_regular(root: Path, *parts: str, limit: int) -> bytes | None:
    """The bytes of root/parts (see `open_regular`); None when it is not there."""
    try:
        with open_regular(root, *parts, limit=limit) as (f, size):
            return f.read(size)
    except FileNotFoundError:
        return None


def create_private(path: Path, *, truncate: bool = False, append: bool = False) -> IO[bytes]:
    """A file of the agent's own, opened for writing: 0600, never through a link planted where it goes (a new
    file, or with `truncate`/`append` an existing regular one)."""
    mode = os.O_TRUNC if truncate else os.O_APPEND if append else os.O_EXCL
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | NOFOLLOW | BINARY | mode, 0o600)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeJobFile(f"{path} is not a regular file")
    return os.fdopen(fd, "ab" if append else "wb")


def copy_out(root: Path, parts: tuple[str, ...], target: Path, *, limit: int) -> Path:
    """Copy a file the trainer wrote into the agent's own part of the folder (checked as `open_regular`)."""
    target.unlink(missing_ok=True)
    with open_regular(root, *parts, limit=limit) as (source, size), create_private(target) as sink:
        left = size
        while left > 0 and (chunk := source.read(min(CHUNK, left))):
            sink.write(chunk)
            left -= len(chunk)
    return target


ADAPTER_WEIGHTS = "adapter/adapter_model.safetensors"
MAX_ADAPTER_MEMBERS = 16


def unpack_adapter_weights(archive: Path, target: Path, *, limit: int, member: str = ADAPTER_WEIGHTS) -> Path:
    """From another worker's adapter archive (a verification lease's input, or the adapter a continued job starts
    from, sha256-checked on download), only its weights (`member`, named by the coordinator: a regular file of at
    most `limit` bytes) are written to `target`, a new file of the agent's; nothing else of the archive is
    extracted, no link is followed or made."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for count, entry in enumerate(tar, start=1):
                if count > MAX_ADAPTER_MEMBERS:
                    break
                if entry.name != member:
                    continue
                if not entry.isfile() or entry.size > limit:
                    raise UnsafeJobFile(f"{member} in the adapter is not a regular file within {limit} bytes")
                source = tar.extractfile(entry)
                assert source is not None
                with create_private(target) as sink:
                    while chunk := source.read(CHUNK):
                        sink.write(chunk)
                return target
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UnsafeJobFile(f"the adapter archive is unreadable ({exc.__class__.__name__})") from None
    raise UnsafeJobFile(f"the adapter archive holds no {member}")


def pack_checkpoint(root: Path, step: int, target: Path, *, limits: dict[str, int] | None = None) -> Path:
    """The checkpoint the trainer wrote for `step` as an archive of its allowed files (`resume/<name>`), each
    read as a regular file; anything else in its folder stays behind."""
    parts = checkpoint_parts(step)
    limits = limits or {name: 64 * 1024**3 for name in fmt.ALLOWED}
    target.unlink(missing_ok=True)
    with create_private(target) as sink, tarfile.open(fileobj=sink, mode="w:gz") as tar:
        folder = tarfile.TarInfo(fmt.ROOT)
        folder.type, folder.mode = tarfile.DIRTYPE, 0o700
        tar.addfile(folder)
        for name in fmt.ALLOWED:
            try:
                with open_regular(root, *parts, name, limit=limits[name]) as (source, size):
                    info = tarfile.TarInfo(f"{fmt.ROOT}/{name}")
                    info.size, info.mode = size, 0o600
                    tar.addfile(info, source)
            except FileNotFoundError:
                if name in fmt.MEMBERS:
                    raise  # only early stopping's best weights are optional (the coordinator checks the rest)
    return target


def pack_folder(root: Path, parts: tuple[str, ...], target: Path, *, allowed: Callable[[str], bool], limit: int) -> Path:
    """The files of root/parts whose names `allowed` takes, each read as a regular file of at most `limit` bytes,
    as an uncompressed tar of one level (an export's merged model: safetensors do not shrink); anything else in the
    folder stays behind, and no name is used that `allowed` did not take."""
    folder = _open_folder(root, parts)
    try:
        names = sorted(name for name in os.listdir(folder) if allowed(name))
    finally:
        os.close(folder)
    if not names:
        raise FileNotFoundError(f"{'/'.join(parts)} holds no file to pack")
    target.unlink(missing_ok=True)
    with create_private(target) as sink, tarfile.open(fileobj=sink, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in names:
            with open_regular(root, *parts, name, limit=limit) as (source, size):
                info = tarfile.TarInfo(name)
                info.size, info.mode = size, 0o600
                tar.addfile(info, source)
    return target


class ProgressReader:
    """New complete lines of `work/out/progress.jsonl` as the trainer appends them, read without following a
    link, a bounded amount per call, and lines longer than `max_line` skipped."""

    def __init__(self, root: Path, offset: int = 0, *, max_read: int = 4 * CHUNK, max_line: int = 64 * 1024) -> None:
        self.root, self.offset, self.max_read, self.max_line = root, offset, max_read, max_line

    def read(self) -> list[tuple[int, bytes]]:
        """Each new whole line with the file offset just past it: a line's place in the file, which a restarted
        reader (and the coordinator, as the event's `seq`) tells apart from every other line by."""
        try:
            with open_regular(self.root, "out", "progress.jsonl", limit=2**62) as (f, _):
                f.seek(self.offset)
                data = f.read(self.max_read)
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        if end == 0:
            if len(data) >= self.max_read:  # no line ends in a whole read: skip it rather than hold it
                self.offset += len(data)
            return []
        lines, at = [], self.offset
        for line in data[:end].split(b"\n")[:-1]:
            at += len(line) + 1
            if len(line) <= self.max_line:
                lines.append((at, line))
        self.offset += end
        return lines

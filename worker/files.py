"""Small, portable file helpers: atomic JSON writes (owner-only when secret), sha256 of files, packing a folder."""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

CHUNK = 1024 * 1024


def write_json_atomic(path: Path, data: Any, *, private: bool = False) -> None:
    """Write to a temporary file in the same folder, then rename: a crash leaves the old or the new file, never
    half of one. `private`: readable by the owner only (0600 on POSIX; on Windows the user's profile folder
    already is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if private and os.name == "posix":
            os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def pack_dir(source: Path, archive: Path, arcname: str) -> Path:
    """`source` as a .tar.gz with its files under `arcname/` (a checkpoint to upload)."""
    tmp = archive.with_name(f".{archive.name}.tmp")
    with tarfile.open(tmp, "w:gz", format=tarfile.USTAR_FORMAT) as tar:  # plain tar: no pax headers (shared.checkpoint)
        tar.add(source, arcname=arcname)
    os.replace(tmp, archive)
    return archive

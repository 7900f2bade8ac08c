"""`worker/files.py`: state and credentials are written whole or not at all (and credentials owner-only), a
missing file reads as nothing, a file's sha256 streams, and a folder packs under the name given."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

from shared.digests import sha256_file
from worker.files import pack_dir, read_json, write_json_atomic


def test_json_is_replaced_whole_and_credentials_are_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "state.json"
    assert read_json(path) is None
    write_json_atomic(path, {"lease": 1})
    write_json_atomic(path, {"lease": 2}, private=True)
    assert read_json(path) == {"lease": 2} and path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temporary file left


def test_sha256_and_packing(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(b"a" * 2_000_000)
    assert sha256_file(data) == hashlib.sha256(data.read_bytes()).hexdigest()
    folder = tmp_path / "step-4"
    folder.mkdir()
    (folder / "state.json").write_text(json.dumps({"step": 4}))
    archive = pack_dir(folder, tmp_path / "checkpoint.tar.gz", arcname="resume")
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["resume", "resume/state.json"]

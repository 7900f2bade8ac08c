"""Reading what W&B's SDK wrote in offline mode (`run-<id>.wandb`): LevelDB-style log records (32 KiB blocks, a
7-byte header each: checksum, length, type) of W&B's protobuf `Record`s. The SDK's own reader is gone from 0.31."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb  # noqa: PLC0415

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pos += 7
        pending += raw[pos:pos + length]
        pos += length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record
        elif kind == 0 and length == 0:
            pending = b""


def runs(directory: Path, wait_s: float = 15.0) -> list[dict[str, Any]]:
    """Every offline run under `directory`: its id, project, name, tags, logged history and whether it exited.
    The SDK's writer is a process of its own that may still be flushing a log after `finish()` returned (seen on
    a loaded machine: a log without its run record yet), so a log without one is read again, for `wait_s` at most."""
    import time  # noqa: PLC0415

    deadline = time.monotonic() + wait_s
    while True:
        found = _read_runs(directory)
        if all("id" in run for run in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _read_runs(directory: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted(directory.rglob("run-*.wandb")):
        run: dict[str, Any] = {"history": [], "exit_code": None, "summary": {}}
        try:
            read = list(records(path))
        except Exception:  # noqa: BLE001 - a log still being written: read again
            found.append(run)
            continue
        for record in read:
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(id=record.run.run_id, project=record.run.project, name=record.run.display_name,
                           tags=list(record.run.tags))
            elif kind == "history":
                run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in record.history.item})
            elif kind == "summary":
                run["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in record.summary.update})
            elif kind == "exit":
                run["exit_code"] = record.exit.exit_code
        found.append(run)
    return found

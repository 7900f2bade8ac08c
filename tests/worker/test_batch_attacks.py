"""A hostile batch program against the agent's part uploads (`worker/agent.py`, `_upload_batch_part`): parts that
are fifos, parts under an `out/batch` folder that is a link out of the job folder, and a part number announced
again and again. The agent sends nothing of any, never blocks, and still reports its outcome."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.worker.test_agent import (
    AnsweringRuntime,
    Exited,
    batch_assignment,
    channel_for,
    make_agent,
    run,
)
from worker.model_cache import MARKER
from worker.runtimes.base import JobMount, Running
from worker.settings import WorkerSettings


@pytest.fixture
def settings(tmp_path: Path) -> WorkerSettings:
    """As tests/worker/test_agent.py's: a process runtime, fast polls, the tiny model's folder cached."""
    settings = WorkerSettings(config_dir=tmp_path / "config", data_dir=tmp_path / "worker", runtime="process",
                              claim_wait_s=0, progress_poll_s=0.01, events_flush_s=0.01, backoff_max_s=0.01)
    cached = settings.model_cache / "tunegrid" / "tiny-llama"
    cached.mkdir(parents=True)
    (cached / MARKER).write_text("tunegrid/tiny-llama")
    return settings


@dataclass
class PlantingRuntime(AnsweringRuntime):
    """`out/batch` a link to a folder of the owner's (holding a part the agent must not read), and in the job
    folder's own `out/` a fifo under the name of a part; each part announced three times."""

    planted: str = "folder-link"
    seen: dict[str, Any] = field(default_factory=dict)
    name: str = "planting"

    def start(self, mount: JobMount) -> Running:
        work = mount.job_dir
        (work / "out").mkdir()
        if self.planted == "folder-link":
            outside = self.secret.parent / "outside"
            outside.mkdir()
            (outside / "part-1.jsonl").write_text(self.secret.read_text())
            (work / "out" / "batch").symlink_to(outside)
        else:
            (work / "out" / "batch").mkdir()
            os.mkfifo(work / "out" / "batch" / "part-1.jsonl")
        lines = [{"type": "started", "kind": "batch", "total_steps": 1}] + [{"type": "batch_part", "part": 1}] * 3
        (work / "out" / "progress.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        return Exited()


def _attack(settings: WorkerSettings, tmp_path: Path, planted: str) -> Any:
    secret = tmp_path / "owner" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text('{"custom_id": "owner-secret"}\n')
    done = b""
    channel = channel_for(batch_assignment(done), batch_done=done)
    run(make_agent(settings, channel, PlantingRuntime(secret=secret, planted=planted)), timeout_s=20)
    return channel


def test_a_part_under_a_linked_out_batch_folder_is_not_sent(settings: WorkerSettings, tmp_path: Path) -> None:
    channel = _attack(settings, tmp_path, "folder-link")
    assert "batch" not in channel.kinds() and channel.kinds()[-1] == "complete"
    assert all(b"owner-secret" not in data for data in channel.uploaded.values())


def test_a_fifo_part_neither_blocks_the_agent_nor_is_sent(settings: WorkerSettings, tmp_path: Path) -> None:
    channel = _attack(settings, tmp_path, "fifo")
    assert "batch" not in channel.kinds() and channel.kinds()[-1] == "complete"

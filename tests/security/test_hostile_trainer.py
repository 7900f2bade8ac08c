"""A hostile job on a real agent: the "trainer" (a script in the trainer's place, as a compromised job would
behave) plants links where the agent reads its outputs and progress lines naming host folders. The agent
reads nothing through them: no host file reaches the coordinator, none is written, and the lease ends as a
worker error instead of a success."""

from __future__ import annotations

import gzip
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from shared.checkpoint import MEMBERS
from tests.e2e.conftest import LiveServer
from tests.e2e.test_agent import registered_agent, submit, worker_settings
from tests.security.conftest import direct_key, storage
from worker.runtimes.base import JobMount, Running
from worker.runtimes.process import ProcessRunning, ProcessRuntime

pytestmark = pytest.mark.live
SECRET = "the PC owner's private key"

HOSTILE = """
import json, os, sys, time
job, secrets = sys.argv[1], sys.argv[2]
out = os.path.join(job, "out")
os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
os.symlink(secrets, os.path.join(out, "checkpoints", "step-2"))        # the checkpoint folder: the owner's home
os.symlink(os.path.join(secrets, "id_ed25519"), os.path.join(out, "adapter.tar.gz"))
os.symlink(os.path.join(secrets, "id_ed25519"), os.path.join(out, "result.json"))
with open(os.path.join(out, "progress.jsonl"), "w") as f:
    for line in ({"type": "started", "total_steps": 4, "resumed_from_step": 0},
                 {"type": "step", "step": 1, "loss": 2.0, "tokens": 10},
                 {"type": "step", "step": 2, "loss": 1.9, "tokens": 20},
                 {"type": "checkpoint", "step": 2, "path": secrets},
                 {"type": "checkpoint", "step": "../../../../" + secrets},
                 {"type": "step", "step": secrets, "loss": 1.0}):
        f.write(json.dumps(line) + "\\n")
time.sleep(2)
"""


def _plain(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


class HostileRuntime(ProcessRuntime):
    """The process runtime, running the hostile script instead of `python -m worker.trainer`."""

    def __init__(self, secrets: Path) -> None:
        self.secrets = secrets

    def start(self, mount: JobMount) -> Running:
        return ProcessRunning(subprocess.Popen([sys.executable, "-c", HOSTILE, str(mount.job_dir), str(self.secrets)]))


def test_a_hostile_trainer_cannot_make_the_agent_read_or_send_host_files(
    coordinator: LiveServer, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    secrets = tmp_path / "owner-home"
    secrets.mkdir()
    for name in (*MEMBERS, "id_ed25519"):  # a folder that would even pass for a checkpoint by its names
        (secrets / name).write_text(SECRET)
    settings = worker_settings(tmp_path / "agent", tiny_model)
    agent = registered_agent(coordinator, settings, monkeypatch)
    agent.runtime = HostileRuntime(secrets)
    customer = direct_key(coordinator, "customer", "carol")
    with httpx.Client(base_url=coordinator.url, headers={"Authorization": f"Bearer {customer}"}, timeout=30) as client:
        job = submit(client, examples=24, hyperparameters={"n_epochs": 2, "batch_size": 2})
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 120
            while True:
                events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=200").json()["data"]
                if any("failed" in e["message"] and "Worker" in e["message"] for e in events):
                    break
                assert time.monotonic() < deadline, [e["message"] for e in events]
                time.sleep(0.3)
        finally:
            agent.stop()
            thread.join(timeout=30)
        status = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"]
        assert status in ("queued", "running"), status  # never succeeded on a planted "adapter"
        assert any("usable adapter" in e["message"] for e in events), [e["message"] for e in events]
        assert client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"] == []
        assert SECRET not in str(events)
        client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    leaked = [p for p in storage(coordinator).rglob("*") if p.is_file() and SECRET.encode() in _plain(p.read_bytes())]
    assert leaked == []
    assert all((secrets / name).read_text() == SECRET for name in (*MEMBERS, "id_ed25519"))

"""The agent against a real coordinator (uvicorn, PostgreSQL) and real trainers (4-bit QLoRA of the tiny model in
`ProcessRuntime` on the CPU), for what crosses processes: the owner's game preempting a job that resumes on
another worker, and an agent killed mid-job reattaching to its trainer. A whole job end to end is
tests/e2e/test_billing.py (and the demo); the agent's own decisions are tests/worker/test_agent.py. This machine
has no NVIDIA driver, so the agents run as CPU-only workers (the real NVML probe finds no GPU) or on a fake NVML."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import chat_lines, jsonl
from tests.e2e.conftest import LiveServer
from worker.agent import Agent
from worker.channel import Channel
from worker.cli import main as worker_cli
from worker.model_cache import MARKER, ModelCache
from worker.nvml import GpuProbe
from worker.policy import PolicyGate, WorkerPolicy
from worker.runtimes.process import ProcessRuntime
from worker.settings import WorkerSettings

JOB_TIMEOUT_S = 240


def worker_settings(tmp_path: Path, tiny_model: Path) -> WorkerSettings:
    settings = WorkerSettings(config_dir=tmp_path / "config", data_dir=tmp_path / "worker", runtime="process",
                              claim_wait_s=2, progress_poll_s=0.2, events_flush_s=0.5, backoff_max_s=1)
    cached = settings.model_cache / "tunegrid" / "tiny-llama"  # the test places the model; real models download
    shutil.copytree(tiny_model, cached)
    (cached / MARKER).write_text("tunegrid/tiny-llama")
    return settings


def registered_agent(server: LiveServer, settings: WorkerSettings, monkeypatch: pytest.MonkeyPatch, *,
                     price: str = "0.05", provider_key: str | None = None) -> Agent:
    monkeypatch.setenv("TUNEGRID_WORKER_CONFIG_DIR", str(settings.config_dir))
    monkeypatch.setenv("TUNEGRID_WORKER_DATA_DIR", str(settings.data_dir))
    provider = provider_key or server.new_key("provider", "pat")
    assert worker_cli(["register", "--coordinator", server.url, "--provider-key", provider, "--price", price,
                       "--machine-id", "test-pc"]) == 0
    credentials_file = settings.credentials_path
    assert credentials_file.stat().st_mode & 0o777 == 0o600
    credentials = json.loads(credentials_file.read_text())
    return Agent(settings=settings, channel=Channel(server.url, credentials["worker_token"], settings), probe=GpuProbe(),
                 gate=PolicyGate(WorkerPolicy()), runtime=ProcessRuntime(), cache=ModelCache(settings.model_cache),
                 heartbeat_interval_s=1.0)


def submit(client: httpx.Client, *, examples: int, **fields: object) -> dict:  # type: ignore[type-arg]
    """Upload a chat dataset and create a tiny-model job on it."""
    file_id = client.post("/v1/files", data={"purpose": "fine-tune"},
                          files={"file": ("train.jsonl", jsonl(chat_lines(examples)))}).json()["id"]
    return client.post("/v1/fine_tuning/jobs",
                       json={"model": "tunegrid/tiny-llama", "training_file": file_id, **fields}).json()


def wait_for(client: httpx.Client, job_id: str, statuses: set[str], timeout_s: float = JOB_TIMEOUT_S) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout_s} s")


def run_until_done(agent: Agent, client: httpx.Client, job_id: str) -> dict:  # type: ignore[type-arg]
    """Run the agent in a thread until the job succeeds or fails; the job as it ended."""
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        return wait_for(client, job_id, {"succeeded", "failed"})
    finally:
        agent.stop()
        thread.join(timeout=30)


@pytest.mark.live
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)  # the agent's side; the database is the production one
def test_the_owners_game_preempts_the_job_and_it_resumes_elsewhere(
    live_server: LiveServer, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Worker A's GPU is a fake NVML layer (no NVIDIA driver here), so the test can start the owner's game on it."""
    from argparse import Namespace  # noqa: PLC0415
    from decimal import Decimal  # noqa: PLC0415

    from tests.worker.fake_nvml import FakeNvml  # noqa: PLC0415
    from worker.cli import register  # noqa: PLC0415

    nvml = FakeNvml()
    settings_a = worker_settings(tmp_path / "a", tiny_model)
    monkeypatch.setenv("TUNEGRID_WORKER_CONFIG_DIR", str(settings_a.config_dir))
    provider = live_server.new_key("provider", "pat")
    assert register(settings_a, GpuProbe(nvml), Namespace(
        coordinator=live_server.url, provider_key=provider, price=Decimal("0.05"), name="gaming-pc",
        machine_id="gaming-pc")) == 0
    token_a = json.loads(settings_a.credentials_path.read_text())["worker_token"]
    agent_a = Agent(settings=settings_a, channel=Channel(live_server.url, token_a, settings_a), probe=GpuProbe(nvml),
                    gate=PolicyGate(WorkerPolicy(idle_grace_s=600, power_cap_w=300)), runtime=ProcessRuntime(),
                    cache=ModelCache(settings_a.model_cache), heartbeat_interval_s=0.5)
    agent_b = registered_agent(live_server, worker_settings(tmp_path / "b", tiny_model), monkeypatch)
    customer = live_server.new_key("customer", "alice")
    threads = []
    with httpx.Client(base_url=live_server.url, headers={"Authorization": f"Bearer {customer}"}, timeout=30) as client:
        # Long enough that the owner's game lands mid-training: at about 20 steps/s here, five epochs (20 steps)
        # could finish before the agent noticed the game, and a finished trainer has no checkpoint to hand on.
        # 600 steps give it half a minute; more only made the second worker train longer (1,800 took 88 s).
        job = submit(client, examples=30, hyperparameters={"n_epochs": 20, "batch_size": 1})
        try:
            threads.append(threading.Thread(target=agent_a.run, daemon=True))
            threads[-1].start()
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while (agent_a.status.step or 0) < 3:
                assert time.monotonic() < deadline, "worker A never started training"
                time.sleep(0.1)
            assert nvml.power_limit_mw == 300_000  # the owner's power cap holds while our job runs
            nvml.processes = [99999]  # the owner starts a game on the GPU
            queued = wait_for(client, job["id"], {"queued", "failed", "succeeded"})
            assert queued["status"] == "queued"
            deadline = time.monotonic() + 30
            while nvml.power_limit_mw != 450_000 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert nvml.power_limit_mw == 450_000  # and the card's own limit is back once it stepped aside
            assert agent_a.status.preempt_seconds and agent_a.status.preempt_seconds[0] < 30
            print(f"policy trip -> trainer stopped: {agent_a.status.preempt_seconds[0]:.2f} s")
            checkpoints = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
            assert checkpoints, "the trainer's checkpoint on SIGTERM was uploaded"
            threads.append(threading.Thread(target=agent_b.run, daemon=True))
            threads[-1].start()
            done = wait_for(client, job["id"], {"succeeded", "failed"})
        finally:
            agent_a.stop()
            agent_b.stop()
            for thread in threads:
                thread.join(timeout=30)
        assert done["status"] == "succeeded", done
        messages = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=1000").json()["data"]]
        assert any("needed it back" in m for m in messages)
        assert any("resuming from checkpoint" in m for m in messages)
        assert any("resuming from step" in m for m in messages)  # the second trainer started from the checkpoint


@pytest.mark.live
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)  # the agent's side; the database is the production one
def test_a_restarted_agent_reattaches_to_its_running_trainer(live_server: LiveServer, tmp_path: Path, tiny_model: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`tunegrid-worker run` is killed with SIGKILL mid-job; its trainer (own session) keeps going, and the next
    agent picks it up from state.json and finishes the job, delivering each step's event once."""
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    settings = worker_settings(tmp_path, tiny_model)
    agent = registered_agent(live_server, settings, monkeypatch)
    env = {**os.environ, "TUNEGRID_WORKER_CONFIG_DIR": str(settings.config_dir),
           "TUNEGRID_WORKER_DATA_DIR": str(settings.data_dir), "TUNEGRID_WORKER_CLAIM_WAIT_S": "2",
           "TUNEGRID_WORKER_PROGRESS_POLL_S": "0.2", "TUNEGRID_WORKER_EVENTS_FLUSH_S": "0.5"}
    customer = live_server.new_key("customer", "alice")
    first = subprocess.Popen([str(Path(sys.executable).parent / "tunegrid-worker"), "run", "--runtime", "process",
                              "--heartbeat-interval", "1"], env=env, stdout=subprocess.DEVNULL,
                             stderr=open(tmp_path / "agent-1.log", "w"))  # noqa: SIM115
    thread = threading.Thread(target=agent.run, daemon=True)
    try:
        with httpx.Client(base_url=live_server.url, headers={"Authorization": f"Bearer {customer}"}, timeout=30) as client:
            job = submit(client, examples=60, hyperparameters={"n_epochs": 8, "batch_size": 1})

            def metric_steps() -> list[int]:
                events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=1000").json()["data"]
                return [e["data"]["step"] for e in events if e["type"] == "metrics" and "train_loss" in e["data"]]

            deadline = time.monotonic() + JOB_TIMEOUT_S
            while len(metric_steps()) < 3:
                assert time.monotonic() < deadline and first.poll() is None, (tmp_path / "agent-1.log").read_text()
                time.sleep(0.2)
            first.send_signal(signal.SIGKILL)  # the agent dies; its trainer does not
            first.wait(timeout=10)
            state = json.loads(settings.state_path.read_text())
            assert os.path.exists(f"/proc/{state['handle']['pid']}")  # the trainer still runs, orphaned
            thread.start()  # a new agent with the same settings
            done = wait_for(client, job["id"], {"succeeded", "failed"})
            assert done["status"] == "succeeded", done
            steps = metric_steps()
            assert len(steps) == len(set(steps)) and set(range(1, max(steps) + 1)) <= set(steps)
            leases = {e["data"].get("lease_id") for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=1000")
                      .json()["data"] if e["type"] == "metrics"}
            assert len(leases) == 1  # the same lease throughout: nothing was requeued
    finally:
        agent.stop()
        if thread.is_alive():
            thread.join(timeout=30)
        if first.poll() is None:
            first.kill()

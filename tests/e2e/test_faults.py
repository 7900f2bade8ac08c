"""Faults with real processes on PostgreSQL and Redis (two coordinator processes' worth of shared state):
a worker machine killed mid-training, the coordinator gone mid-job (restarted, Redis flushed meanwhile), and a
full disk during an upload. (A worker's skewed clock is in test_agent.py's end-to-end run.) Times are scaled down (lease ttl 2 s, grace 8 s) so the
suite stays short; the mechanisms are the production ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import create_engine, select

from coordinator.db.tables import JobCheckpointModel, UsageRecordModel
from tests.e2e.conftest import LiveServer, _free_port, start_server, stop_server
from tests.e2e.test_agent import JOB_TIMEOUT_S, registered_agent, run_until_done, submit, wait_for, worker_settings
from worker.settings import WorkerSettings

FAST_LEASES = {"TUNEGRID_LEASE_TTL_S": "2", "TUNEGRID_LEASE_GRACE_S": "8", "TUNEGRID_SWEEP_INTERVAL_S": "0.5",
               "TUNEGRID_CHECKPOINT_EVERY_STEPS": "3", "TUNEGRID_PERIODIC_TASKS": "true"}


@pytest.fixture
def live_env(redis_url: str) -> dict[str, str]:
    redis.Redis.from_url(redis_url).flushdb()
    return {"TUNEGRID_REDIS_URL": redis_url, **FAST_LEASES}


def _agent_process(settings: WorkerSettings, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TUNEGRID_WORKER_CONFIG_DIR": str(settings.config_dir),
           "TUNEGRID_WORKER_DATA_DIR": str(settings.data_dir), "TUNEGRID_WORKER_CLAIM_WAIT_S": "2",
           "TUNEGRID_WORKER_PROGRESS_POLL_S": "0.2", "TUNEGRID_WORKER_EVENTS_FLUSH_S": "0.5"}
    return subprocess.Popen([str(Path(sys.executable).parent / "tunegrid-worker"), "run", "--runtime", "process",
                             "--heartbeat-interval", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=log.open("w"), start_new_session=True)


def _kill_machine(agent: subprocess.Popen[bytes], jobs_dir: Path) -> None:
    """SIGKILL the agent and every process working in its job directory (the trainer runs in its own session):
    as if the PC lost power."""
    os.killpg(agent.pid, signal.SIGKILL)
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(jobs_dir) in (proc / "cmdline").read_bytes().decode(errors="ignore"):
                    os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                continue
    agent.wait(timeout=10)


def _database(server: LiveServer) -> str:
    return server.env["TUNEGRID_DATABASE_URL"]


@pytest.mark.live
@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_worker_killed_mid_training_loses_only_unsaved_work(live_server: LiveServer, tmp_path: Path,
                                                              tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings_a = worker_settings(tmp_path / "a", tiny_model)
    registered_agent(live_server, settings_a, monkeypatch, provider_key=live_server.new_key("provider", "pat"))
    customer = live_server.new_key("customer", "alice")
    machine_a = _agent_process(settings_a, tmp_path / "agent-a.log")
    with httpx.Client(base_url=live_server.url, headers={"Authorization": f"Bearer {customer}"}, timeout=30) as client:
        job = submit(client, examples=60, hyperparameters={"n_epochs": 3, "batch_size": 1})
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]:
            assert time.monotonic() < deadline and machine_a.poll() is None, "worker A never checkpointed"
            time.sleep(0.2)
        time.sleep(1.0)  # some work past the checkpoint, which will be lost
        _kill_machine(machine_a, settings_a.jobs_dir)
        queued = wait_for(client, job["id"], {"queued"}, timeout_s=60)  # after the grace, not before
        assert queued["status"] == "queued"
        agent_b = registered_agent(live_server, worker_settings(tmp_path / "b", tiny_model), monkeypatch,
                                   provider_key=live_server.new_key("provider", "quinn"))
        done = run_until_done(agent_b, client, job["id"])
        assert done["status"] == "succeeded", done
        messages = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=1000").json()["data"]]
        assert any("was not heard from" in m for m in messages) and any("resuming from checkpoint" in m for m in messages)

    engine = create_engine(_database(live_server))
    with engine.connect() as conn:
        usage = conn.execute(select(UsageRecordModel).where(UsageRecordModel.job_id == job["id"])
                             .order_by(UsageRecordModel.created_at)).all()
        lost, finished = usage[0], usage[-1]
        last_checkpoint = conn.execute(select(JobCheckpointModel.created_at).where(
            JobCheckpointModel.lease_id == lost.lease_id).order_by(JobCheckpointModel.created_at.desc())).first()[0]
    engine.dispose()
    assert lost.rule == "until_checkpoint" and lost.billed_until <= last_checkpoint  # the lost work is not billed
    assert lost.billable_seconds < lost.observed_seconds + 1 and finished.rule == "until_end"
    assert float(done["cost"]) * 1_000_000 == pytest.approx(sum(u.charge_micros for u in usage), abs=1)
    assert "postings total: 0 micro-dollars; unbalanced transactions: 0" in live_server.cli("ledger", "audit")


@pytest.mark.live
def test_coordinator_restart_and_redis_flush_mid_job_lose_nothing(postgres_url: str, redis_url: str, tmp_path: Path,
                                                                 tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator goes away for longer than the lease ttl (for the worker, a network drop), Redis is flushed
    while it is down, and a new coordinator process comes up on the same port: the job is not killed (grace),
    the worker carries on, and its buffered events arrive, each once."""
    from tests.conftest import truncate_all  # noqa: PLC0415

    port = _free_port()
    env = {**os.environ, "TUNEGRID_DATA_DIR": str(tmp_path / "data"), "TUNEGRID_PORT": str(port),
           "TUNEGRID_LOG_LEVEL": "warning", "TUNEGRID_DATABASE_URL": postgres_url, "TUNEGRID_REDIS_URL": redis_url,
           **FAST_LEASES, "TUNEGRID_LEASE_GRACE_S": "30"}
    server = LiveServer(url=f"http://127.0.0.1:{port}", env=env)
    server.migrate()
    process = start_server(env, tmp_path / "server-1.log", server.url)
    agent = registered_agent(server, worker_settings(tmp_path / "w", tiny_model), monkeypatch)
    customer = server.new_key("customer", "alice")
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {customer}"}, timeout=30) as client:
            job = submit(client, examples=60, hyperparameters={"n_epochs": 6, "batch_size": 1})
            import threading  # noqa: PLC0415

            thread = threading.Thread(target=agent.run, daemon=True)
            thread.start()
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while (agent.status.step or 0) < 2:
                assert time.monotonic() < deadline, "training never started"
                time.sleep(0.1)
            stop_server(process)
            outage_step = agent.status.step or 0
            redis.Redis.from_url(redis_url).flushdb()  # hot state gone: heartbeats, recheck flags, rate counts
            time.sleep(4.5)  # over two lease ttls without a word
            assert (agent.status.step or 0) > outage_step  # the job kept training through it
            process = start_server(env, tmp_path / "server-2.log", server.url)
            done = wait_for(client, job["id"], {"succeeded", "failed"})
            agent.stop()
            thread.join(timeout=30)
            assert done["status"] == "succeeded", done
            events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=1000").json()["data"]
            steps = [e["data"]["step"] for e in events if e["type"] == "metrics" and "train_loss" in e["data"]]
            assert len(steps) == len(set(steps)) and set(range(1, max(steps) + 1)) <= set(steps)
            assert max(steps) > outage_step + 1
            assert not any("resuming from checkpoint" in e["message"] for e in events)  # never moved
            assert "unbalanced transactions: 0; drifted balances: 0" in server.cli("ledger", "audit")
    finally:
        stop_server(process)
        truncate_all(postgres_url)


def _mount_tiny_disk(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB filesystem (tmpfs) to fill; needs root, as CI and this sandbox have."""
    disk = tmp_path / "disk"
    if not _mount_tiny_disk(disk, "256k"):
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_full_disk_during_an_upload_is_507_and_stores_nothing(tiny_disk: Path, settings, make_caller) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient  # noqa: PLC0415

    from coordinator.app import create_app  # noqa: PLC0415
    from tests.conftest import chat_lines, jsonl  # noqa: PLC0415
    from tests.fakes import FakeAgent  # noqa: PLC0415

    app = create_app(settings.model_copy(update={"storage_dir": tiny_disk, "max_upload_bytes": 4 * 1024 * 1024}))
    customer, provider = make_caller("customer", "alice"), make_caller("provider", "pat")
    with TestClient(app, raise_server_exceptions=False) as client:
        small = client.post("/v1/files", headers=customer.headers, data={"purpose": "fine-tune"},
                            files={"file": ("t.jsonl", jsonl(chat_lines(12)), "application/jsonl")})
        assert small.status_code == 200, small.text
        agent = FakeAgent.register(client, provider.key)
        client.post("/v1/fine_tuning/jobs", headers=customer.headers,
                    json={"model": "tunegrid/tiny-llama", "training_file": small.json()["id"]})
        lease = agent.claim(wait_s=2)
        assert lease is not None
        before = sorted(p.relative_to(tiny_disk) for p in tiny_disk.rglob("*") if p.is_file())
        big = os.urandom(1024 * 1024)  # four times the disk
        full = agent.upload(lease["lease_id"], "checkpoint", big, step=1)
        assert full.status_code == 507 and full.json()["error"]["code"] == "insufficient_storage", full.text
        too_big_file = client.post("/v1/files", headers=customer.headers, data={"purpose": "fine-tune"},
                                   files={"file": ("big.jsonl", jsonl(chat_lines(9000)), "application/jsonl")})
        assert too_big_file.status_code == 507, too_big_file.text
        after = sorted(p.relative_to(tiny_disk) for p in tiny_disk.rglob("*") if p.is_file())
        assert after == before  # nothing half-stored
        listed = client.get(f"/v1/fine_tuning/jobs/{lease['job_id']}/checkpoints", headers=customer.headers).json()
        assert listed["data"] == []
        assert agent.save_checkpoint(lease["lease_id"], 1).status_code == 200  # room again
    app.state.engine.dispose()

"""No job is ever placed twice: 200 queued jobs, 50 workers claiming at once through two coordinator
processes on one PostgreSQL and one Redis, with both processes also sweeping the queue every 0.2 s.
The workers are protocol-level fakes (`tests.fakes.FakeAgent`): they finish at once with a fake adapter."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.conftest import chat_lines, jsonl, truncate_all
from tests.e2e.conftest import LiveServer, _free_port, start_server, stop_server
from tests.fakes import FakeAgent

JOBS, CLAIMERS = 80, 20
DEADLINE_S = 120


@pytest.mark.live
def test_every_job_is_placed_exactly_once(postgres_url: str, redis_url: str, tmp_path: Path) -> None:
    servers, processes = [], []
    try:
        for i in range(2):
            port = _free_port()
            env = {**os.environ, "TUNEGRID_DATA_DIR": str(tmp_path / "data"), "TUNEGRID_PORT": str(port),
                   "TUNEGRID_LOG_LEVEL": "warning", "TUNEGRID_DATABASE_URL": postgres_url,
                   "TUNEGRID_REDIS_URL": redis_url, "TUNEGRID_PERIODIC_TASKS": "true", "TUNEGRID_SWEEP_INTERVAL_S": "0.2"}
            server = LiveServer(url=f"http://127.0.0.1:{port}", env=env)
            if i == 0:
                server.migrate()
            processes.append(start_server(env, tmp_path / f"server-{i}.log", server.url))
            servers.append(server)
        customer, provider = servers[0].new_key("customer", "alice"), servers[0].new_key("provider", "pat")
        auth = {"Authorization": f"Bearer {customer}"}

        with httpx.Client(base_url=servers[0].url, timeout=30) as client:
            upload = client.post("/v1/files", headers=auth, data={"purpose": "fine-tune"},
                                 files={"file": ("train.jsonl", jsonl(chat_lines()), "application/jsonl")})
            file_id = upload.json()["id"]
            for _ in range(JOBS):
                created = client.post("/v1/fine_tuning/jobs", headers=auth,
                                      json={"model": "tunegrid/tiny-llama", "training_file": file_id})
                assert created.status_code == 200, created.text

        placements: list[tuple[str, int]] = []
        lock, finished = threading.Lock(), threading.Event()
        start = threading.Barrier(CLAIMERS)

        def claimer(n: int) -> None:
            with httpx.Client(base_url=servers[n % 2].url, timeout=30) as client:
                agent = FakeAgent.register(client, provider, machine_id=f"pc-{n}")
                start.wait()
                deadline = time.monotonic() + DEADLINE_S
                while not finished.is_set() and time.monotonic() < deadline:
                    assignment = agent.claim(wait_s=0.5)
                    if assignment is None:
                        continue
                    with lock:
                        placements.append((assignment["job_id"], assignment["fencing_token"]))
                    done = agent.finish(assignment["lease_id"])
                    assert done.status_code == 200 and done.json()["job_status"] == "succeeded", done.text
                    with lock:
                        if len(placements) >= JOBS:
                            finished.set()

        with ThreadPoolExecutor(CLAIMERS) as pool:
            for future in [pool.submit(claimer, n) for n in range(CLAIMERS)]:
                future.result()

        assert len(placements) == JOBS
        assert len({job for job, _ in placements}) == JOBS  # no job handed out twice
        assert {token for _, token in placements} == {1}
        engine = create_engine(postgres_url)
        with engine.connect() as conn:
            leases_per_job = conn.execute(text("SELECT job_id, count(*) FROM leases GROUP BY job_id")).all()
            statuses = dict(conn.execute(text("SELECT status, count(*) FROM jobs GROUP BY status")).all())
        engine.dispose()
        assert len(leases_per_job) == JOBS and {count for _, count in leases_per_job} == {1}
        assert statuses == {"succeeded": JOBS}
    finally:
        for process in processes:
            stop_server(process)
        truncate_all(postgres_url)

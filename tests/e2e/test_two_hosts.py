"""Two coordinator hosts that share nothing but PostgreSQL, Redis and the object store (a real S3 server,
SeaweedFS), each with a data directory of its own: a customer uploads and creates a job through the first with the
official `openai` client, a real agent (tiny-model QLoRA in a process on the CPU) trains it talking only to the
second, and the customer downloads the fine-tune through the first. The worker's datasets, checkpoints and adapter
go by presigned URL: the second host's access log (every request's body bytes in and out) shows no blob bytes."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from coordinator.s3store import S3Store
from tests.conftest import chat_lines, jsonl, truncate_all
from tests.e2e.conftest import LiveServer, _free_port, start_server, stop_server
from tests.e2e.test_agent import registered_agent, run_until_done, worker_settings


def _host(common: dict[str, str], data_dir: Path, *, periodic: bool) -> LiveServer:
    port = _free_port()
    env = {**common, "TUNEGRID_DATA_DIR": str(data_dir), "TUNEGRID_PORT": str(port),
           "TUNEGRID_PERIODIC_TASKS": "true" if periodic else "false"}
    return LiveServer(url=f"http://127.0.0.1:{port}", env=env)


def _access(log: Path) -> list[dict]:  # type: ignore[type-arg]
    lines = []
    for raw in log.read_text().splitlines():
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if line.get("logger") == "tunegrid.access":
            lines.append(line)
    return lines


def _stored(store: S3Store, folder: str) -> dict[str, int]:
    return {key: store.size(key) or 0 for key, _, _ in store.stored(folder)}


@pytest.mark.live
def test_two_hosts_share_only_the_database_redis_and_the_object_store(
    postgres_url: str, redis_url: str, s3_config: dict[str, str], tmp_path: Path, tiny_model: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    common = {**os.environ, "TUNEGRID_DATABASE_URL": postgres_url, "TUNEGRID_REDIS_URL": redis_url,
              "TUNEGRID_STORAGE_URL": s3_config["storage_url"], "TUNEGRID_S3_ENDPOINT_URL": s3_config["s3_endpoint_url"],
              "TUNEGRID_S3_ACCESS_KEY_ID": s3_config["s3_access_key_id"],
              "TUNEGRID_S3_SECRET_ACCESS_KEY": s3_config["s3_secret_access_key"],
              "TUNEGRID_LOG_FORMAT": "json", "TUNEGRID_LOG_LEVEL": "info", "TUNEGRID_SWEEP_INTERVAL_S": "1",
              "TUNEGRID_CHECKPOINT_EVERY_STEPS": "3"}
    # The first host runs the periodic work (validation, sweeps); with Celery beat that would be a third process.
    first, second = _host(common, tmp_path / "host-a", periodic=True), _host(common, tmp_path / "host-b", periodic=False)
    first.migrate()
    processes = [start_server(first.env, tmp_path / "a.log", first.url),
                 start_server(second.env, tmp_path / "b.log", second.url)]
    store = S3Store.from_url(s3_config["storage_url"], endpoint_url=s3_config["s3_endpoint_url"],
                             access_key_id=s3_config["s3_access_key_id"],
                             secret_access_key=s3_config["s3_secret_access_key"])
    try:
        customer = first.new_key("customer", "alice")
        openai = OpenAI(base_url=f"{first.url}/v1", api_key=customer, max_retries=0, timeout=60)
        uploaded = openai.files.create(file=("train.jsonl", io.BytesIO(jsonl(chat_lines(20)))), purpose="fine-tune")
        job = openai.fine_tuning.jobs.create(model="tunegrid/tiny-llama", training_file=uploaded.id,
                                             hyperparameters={"n_epochs": 2, "batch_size": 1})

        settings = worker_settings(tmp_path, tiny_model)
        agent = registered_agent(second, settings, monkeypatch, provider_key=second.new_key("provider", "pat"))
        with httpx.Client(base_url=first.url, headers={"Authorization": f"Bearer {customer}"}, timeout=30) as client:
            done = run_until_done(agent, client, job.id)
        assert done["status"] == "succeeded", done

        # The fine-tune, downloaded through the first host: a redirect the openai client follows to the store.
        [result_id] = done["result_files"]
        result = openai.files.retrieve(result_id)
        content = openai.files.content(result_id).read()
        assert len(content) == result.bytes and hashlib.sha256(content).hexdigest() == result.sha256  # type: ignore[attr-defined]
        checkpoints = openai.fine_tuning.jobs.checkpoints.list(job.id).data
        assert checkpoints, "the job checkpointed (every 3 steps)"

        # What the store holds, and what went through the second host: no blob's bytes, either way.
        blobs = {**_stored(store, "checkpoints"), **_stored(store, "adapters"), **_stored(store, "files")}
        assert [key for key, _, _ in store.stored("incoming")] == []  # every direct upload adopted
        worker_calls = [line for line in _access(tmp_path / "b.log") if line["route"] and "/leases/" in line["route"]]
        uploads = [line for line in worker_calls if line["method"] == "PUT"]
        inputs = [line for line in worker_calls if line["method"] == "GET"]
        assert {line["route"].rsplit("/", 1)[-1] for line in uploads} >= {"checkpoints", "adapter"}
        assert all(line["status"] == 200 and line["bytes_in"] == 0 for line in uploads), uploads
        assert inputs and all(line["status"] == 307 and line["bytes_out"] == 0 for line in inputs), inputs
        smallest = min(size for key, size in blobs.items() if not key.startswith("files/"))
        traffic = sum(line["bytes_in"] + line["bytes_out"] for line in _access(tmp_path / "b.log"))
        assert traffic < smallest, (traffic, blobs)  # every call of the whole job together: less than one checkpoint
        [download] = [line for line in _access(tmp_path / "a.log") if line["route"] == "/v1/files/{file_id}/content"]
        assert download["status"] == 307 and download["bytes_out"] == 0

        # Separate data directories, and neither holds a blob.
        for host in ("host-a", "host-b"):
            on_disk = [p for p in (tmp_path / host).rglob("*") if p.is_file() and "storage" in p.parts]
            assert on_disk == [], on_disk
    finally:
        for process in processes:
            stop_server(process)
        truncate_all(postgres_url)

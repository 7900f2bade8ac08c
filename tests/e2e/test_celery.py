"""Celery for real: a worker with beat, on the Redis broker, places a queued job on an idle worker and
publishes the wake-up that ends that worker's long-poll in whichever API process holds it."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from coordinator.db.engine import make_engine, make_sessionmaker
from coordinator.db.tables import JobModel, JobStatus, LeaseModel, Role, WorkerState, utcnow
from coordinator.hotstate import WAKE_CHANNEL
from coordinator.services import billing, files, jobs, keys, workers
from coordinator.settings import CoordinatorSettings
from coordinator.storage import DiskStore
from shared.money import usd_to_micros
from shared.protocol import WorkerRegister
from shared.schemas.jobs import JobCreate
from tests.conftest import chat_lines, jsonl, truncate_all
from tests.fakes import registration

BIN = Path(sys.executable).parent


@pytest.mark.live
def test_celery_beat_places_a_queued_job_and_wakes_the_worker(postgres_url: str, redis_url: str, tmp_path: Path) -> None:
    settings = CoordinatorSettings(database_url=postgres_url, storage_dir=tmp_path / "storage", data_dir=tmp_path)
    sessions = make_sessionmaker(make_engine(settings))
    with sessions() as session:
        customer = keys.create_account(session=session, name="alice", role=Role.customer)
        provider = keys.create_account(session=session, name="pat", role=Role.provider)
        file = files.upload(session=session, store=(store := DiskStore(tmp_path / "storage")), account=customer, filename="t.jsonl",
                            purpose="fine-tune", source=io.BytesIO(jsonl(chat_lines())), max_bytes=10**6,
                            min_examples=10, retention=timedelta(days=1))
        billing.grant(session=session, account=customer, amount=usd_to_micros(10), key="test", memo="test credit")
        job = jobs.create(session=session, store=store, account=customer, settings=settings,
                          request=JobCreate(model="tunegrid/tiny-llama", training_file=file.id))
        job = jobs.finish_validation(session=session, store=store, job_id=job.id)
        worker, _ = workers.register(session=session, account=provider,
                                     request=WorkerRegister.model_validate(registration("pc-1")), protocol_version=1,
                                     max_workers=100)
        worker.state, worker.available_until = WorkerState.idle, utcnow() + timedelta(minutes=5)
        session.commit()
        job_id, worker_id = job.id, worker.id

    listener = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
    listener.subscribe(WAKE_CHANNEL)
    env = {**os.environ, "TUNEGRID_DATABASE_URL": postgres_url, "TUNEGRID_REDIS_URL": redis_url,
           "TUNEGRID_SWEEP_INTERVAL_S": "0.5", "TUNEGRID_DATA_DIR": str(tmp_path)}
    log = (tmp_path / "celery.log").open("w")
    celery = subprocess.Popen([str(BIN / "celery"), "-A", "coordinator.tasks", "worker", "--beat", "--pool", "solo",
                               "--loglevel", "info", "--schedule", str(tmp_path / "beat-schedule")],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        woken = None
        deadline = time.monotonic() + 45
        while woken is None and time.monotonic() < deadline and celery.poll() is None:
            message = listener.get_message(timeout=0.5)
            if message and message["data"].decode() == worker_id:
                woken = message["data"].decode()
        assert woken == worker_id, (tmp_path / "celery.log").read_text()[-3000:]
        with sessions() as session:
            assert session.get(JobModel, job_id).status is JobStatus.running  # type: ignore[union-attr]
            lease = session.scalars(select(LeaseModel).where(LeaseModel.job_id == job_id)).one()
            assert lease.worker_id == worker_id and lease.fencing_token == 1
    finally:
        celery.terminate()
        try:
            celery.wait(timeout=20)
        except subprocess.TimeoutExpired:
            celery.kill()
        log.close()
        listener.close()
        truncate_all(postgres_url)

"""Blobs have a life (coordinator/services/blobs.py): after a job's whole life (a dataset, checkpoints, an
adapter, a worker's abandoned upload and an orphan), expiry, an ended job's scratch and the orphan sweep
bring the storage folder back to its size; nothing recent or still referenced is touched."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from coordinator.db.tables import FileModel, JobModel, utcnow
from coordinator.services import blobs
from coordinator.settings import CoordinatorSettings
from coordinator.storage import DiskStore
from tests.fakes import FakeAgent, adapter_archive


@pytest.fixture
def provider(make_caller):  # type: ignore[no-untyped-def]
    return make_caller("provider", "pat")


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _aged(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_after_a_jobs_life_the_storage_folder_returns_to_its_size(
    client: TestClient, session: Session, settings: CoordinatorSettings, provider, customer, upload,  # type: ignore[no-untyped-def]
) -> None:
    root = settings.resolved_storage_dir
    before = _size(root)
    file_id = upload(customer).json()["id"]
    job = client.post("/v1/fine_tuning/jobs", headers=customer.headers,
                      json={"model": "tunegrid/tiny-llama", "training_file": file_id}).json()
    agent = FakeAgent.register(client, provider.key)
    a = agent.claim(wait_s=2)
    assert a is not None
    for step in (1, 2, 3):
        assert agent.save_checkpoint(a["lease_id"], step).status_code == 200
    adapter = adapter_archive()
    assert agent.upload(a["lease_id"], "adapter", adapter).status_code == 200
    assert agent.complete(a["lease_id"], adapter).json()["job_status"] == "succeeded"
    # What a crash or a hostile worker leaves: a blob no row knows, an upload abandoned half way.
    orphan = root / "checkpoints" / "ftckpt-orphan"
    orphan.write_bytes(b"x" * 5000)
    abandoned = root / "adapters" / a["lease_id"] / ".incoming-abc"
    abandoned.parent.mkdir(parents=True, exist_ok=True)
    abandoned.write_bytes(b"y" * 5000)
    for path in (orphan, abandoned):
        _aged(path, blobs.ORPHAN_GRACE_S + 60)
    assert _size(root) > before

    result_file = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=customer.headers).json()["result_files"][0]
    assert client.delete(f"/v1/files/{result_file}", headers=customer.headers).status_code == 200
    session.execute(update(FileModel).where(FileModel.id == file_id).values(expires_at=utcnow() - timedelta(seconds=1)))
    session.execute(update(JobModel).where(JobModel.id == job["id"]).values(finished_at=utcnow() - timedelta(days=2)))
    session.commit()
    collected = blobs.collect(session=session, store=DiskStore(root), settings=settings)
    assert (collected.files, collected.checkpoints, collected.orphans) == (1, 3, 2)
    assert _size(root) == before
    listed = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=customer.headers).json()["data"]
    assert len(listed) == 3  # the rows and their metrics stay
    assert blobs.collect(session=session, store=DiskStore(root), settings=settings).orphans == 0  # idempotent


def test_what_is_recent_running_or_referenced_is_kept(
    client: TestClient, session: Session, settings: CoordinatorSettings, provider, customer, upload,  # type: ignore[no-untyped-def]
) -> None:
    root = settings.resolved_storage_dir
    file_id = upload(customer).json()["id"]
    client.post("/v1/fine_tuning/jobs", headers=customer.headers,
                json={"model": "tunegrid/tiny-llama", "training_file": file_id})
    agent = FakeAgent.register(client, provider.key)
    a = agent.claim(wait_s=2)
    assert a is not None and agent.save_checkpoint(a["lease_id"], 1).status_code == 200
    in_flight = root / "checkpoints" / ".incoming-now"
    in_flight.write_bytes(b"z" * 100)  # an upload being written right now
    session.execute(update(FileModel).where(FileModel.id == file_id).values(expires_at=utcnow() - timedelta(seconds=1)))
    session.commit()
    for path in root.rglob("*"):
        if path.is_file() and path != in_flight:
            _aged(path, blobs.ORPHAN_GRACE_S + 60)  # old, but referenced
    before = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    collected = blobs.collect(session=session, store=DiskStore(root), settings=settings)
    assert (collected.files, collected.checkpoints, collected.orphans) == (0, 0, 0)  # its job still runs on it
    assert sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()) == before


def test_an_ended_jobs_training_copy_and_held_out_sample_are_deleted_after_the_retention(
    client: TestClient, session: Session, settings: CoordinatorSettings, customer, upload,  # type: ignore[no-untyped-def]
) -> None:
    from tests.conftest import chat_lines, jsonl  # noqa: PLC0415

    root = settings.resolved_storage_dir
    file_id = upload(customer, jsonl(chat_lines(40))).json()["id"]
    job = client.post("/v1/fine_tuning/jobs", headers=customer.headers,
                      json={"model": "tunegrid/tiny-llama", "training_file": file_id}).json()
    folder = root / "jobs" / job["id"]
    assert sorted(p.name for p in folder.iterdir()) == ["held-out.jsonl", "training.jsonl"]
    assert blobs.collect(session=session, store=DiskStore(root), settings=settings).held_out == 0  # still queued
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=customer.headers).status_code == 200
    assert blobs.collect(session=session, store=DiskStore(root), settings=settings).held_out == 0  # within retention
    session.execute(update(JobModel).where(JobModel.id == job["id"]).values(finished_at=utcnow() - timedelta(days=2)))
    session.commit()
    assert blobs.collect(session=session, store=DiskStore(root), settings=settings).held_out == 1
    assert not any(folder.iterdir())
    assert blobs.collect(session=session, store=DiskStore(root), settings=settings).held_out == 0  # once


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_the_object_store_returns_to_its_size_too(s3_settings: CoordinatorSettings, session: Session, make_caller,  # type: ignore[no-untyped-def]
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The same life on S3 (SeaweedFS), with what is left there: a blob no row knows, a direct upload never adopted,
    a multipart upload never completed. S3 keeps its own times, so the collector's clock is moved on instead."""
    import io  # noqa: PLC0415

    from coordinator.app import create_app  # noqa: PLC0415
    from coordinator.stores import open_store  # noqa: PLC0415
    from tests.conftest import chat_lines, jsonl  # noqa: PLC0415

    store = open_store(s3_settings)
    customer, provider = make_caller("customer", "alice"), make_caller("provider", "pat")
    app = create_app(s3_settings)
    with TestClient(app) as client:
        file_id = client.post("/v1/files", headers=customer.headers, data={"purpose": "fine-tune"},
                              files={"file": ("t.jsonl", jsonl(chat_lines()), "application/jsonl")}).json()["id"]
        job = client.post("/v1/fine_tuning/jobs", headers=customer.headers,
                          json={"model": "tunegrid/tiny-llama", "training_file": file_id}).json()
        agent = FakeAgent.register(client, provider.key)
        a = agent.claim(wait_s=2)
        assert a is not None
        for step in (1, 2):
            assert agent.save_checkpoint(a["lease_id"], step).status_code == 200
        adapter = adapter_archive()
        assert agent.upload(a["lease_id"], "adapter", adapter).status_code == 200
        assert agent.complete(a["lease_id"], adapter).json()["job_status"] == "succeeded"
        result_file = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=customer.headers).json()["result_files"][0]
        assert client.delete(f"/v1/files/{result_file}", headers=customer.headers).status_code == 200
    app.state.engine.dispose()
    store.put("checkpoints/ftckpt-orphan", io.BytesIO(b"x" * 5000))
    store.put(f"incoming/{a['lease_id']}/checkpoint-up-never", io.BytesIO(b"y" * 5000))
    store.client.create_multipart_upload(Bucket=store.bucket, Key=store.name("exports/l/up-cut"))  # type: ignore[attr-defined]
    session.execute(update(FileModel).where(FileModel.id == file_id).values(expires_at=utcnow() - timedelta(seconds=1)))
    session.execute(update(JobModel).where(JobModel.id == job["id"]).values(finished_at=utcnow() - timedelta(days=2)))
    session.commit()
    later = time.time() + blobs.ABANDONED_UPLOAD_GRACE_S + 60
    monkeypatch.setattr(blobs.time, "time", lambda: later)
    monkeypatch.setattr("coordinator.s3store.time.time", lambda: later)
    collected = blobs.collect(session=session, store=store, settings=s3_settings)
    assert (collected.files, collected.checkpoints) == (1, 2) and collected.orphans >= 3
    left = [key for folder in ("files", "checkpoints", "adapters", "incoming", "exports", "jobs")
            for key, _, _ in store.stored(folder)]
    assert left == [], left
    assert store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix).get("Uploads", []) == []  # type: ignore[attr-defined]

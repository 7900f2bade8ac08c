"""`services/export_leases.py` on a real database: an export lease uploads each format its export asks for and
completes; checked uploads become the customer's files beside a Modelfile the coordinator writes, billed like a
training lease; an upload that is not what it claims fails the lease as a failed check (not billed, an attempt
used, placed again), and a worker cannot upload what was not asked, nor complete before uploading."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from coordinator.db.tables import (
    AccountModel, FileModel, JobEventModel, JobModel, JobStatus, LeaseModel, LeaseStatus, UsageRecordModel,
)
from coordinator.services import files
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from shared.errors import Conflict, InvalidRequest
from tests.coordinator.services.test_exports import KINDS, NewJob, request, succeeded
from tests.fakes import ServiceAgent, gguf_file, merged_archive


def _export_lease(session: Session, store: BlobStore, settings: CoordinatorSettings, account: AccountModel,
                  agent: ServiceAgent, new_job: NewJob, formats: list[str]) -> tuple[JobModel, JobModel, str]:
    job = succeeded(session, agent, new_job, suffix="mine")
    export = request(session, store, settings, account, job, formats=formats)
    a = agent.claim(kinds=KINDS)
    assert a is not None and a.job_id == export.id
    agent.events(a.lease_id, {"type": "started", "total_steps": len(formats), "message": "Export started on cpu"})
    return job, export, a.lease_id


def test_checked_uploads_become_the_customers_files_with_a_modelfile(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent], new_job: NewJob, tmp_path: Path,
) -> None:
    agent = service_agent()
    job, export, lease_id = _export_lease(session, store, settings, customer_account, agent, new_job,
                                          ["merged", "gguf:q8_0"])
    agent.upload_export(lease_id, "merged", merged_archive())
    agent.upload_export(lease_id, "gguf:q8_0", gguf_file(tmp_path / "m.gguf").read_bytes())
    agent.complete_export(lease_id)
    session.expire_all()
    done = session.get(JobModel, export.id)
    assert done is not None and done.status is JobStatus.succeeded
    listed = {f["format"]: f for f in done.export["files"]}  # type: ignore[index]
    assert list(listed) == ["merged", "gguf:q8_0", "modelfile:gguf:q8_0"] and done.result_files == [
        f["file_id"] for f in listed.values()]
    for entry in listed.values():
        file = session.get(FileModel, entry["file_id"])
        assert file is not None and file.account_id == customer_account.id and file.purpose == "fine-tune-results"
        assert store.sha256(files.blob_key(file.id)) == file.sha256 and file.bytes == entry["bytes"]
    assert listed["gguf:q8_0"]["filename"] == f"{export.id}-q8_0.gguf"
    modelfile = store.path(files.blob_key(listed["modelfile:gguf:q8_0"]["file_id"])).read_text()
    assert f"FROM ./{export.id}-q8_0.gguf\n" in modelfile and job.fine_tuned_model in modelfile  # type: ignore[operator]
    assert not list(store.root.glob(f"exports/{lease_id}/*"))  # the uploads' own names are gone
    lease = session.get(LeaseModel, lease_id)
    assert lease is not None and lease.status is LeaseStatus.completed
    record = session.query(UsageRecordModel).filter_by(lease_id=lease_id).one()
    assert record.rule == "until_end" and record.customer_id == customer_account.id  # billed as training is
    events = [e.message for e in session.query(JobEventModel).filter_by(job_id=job.id)]
    assert any(m.startswith(f"Export {export.id} completed") for m in events)


def test_a_lying_upload_fails_the_lease_unbilled_and_the_export_goes_elsewhere(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent], new_job: NewJob, tmp_path: Path,
) -> None:
    agent = service_agent()
    _, export, lease_id = _export_lease(session, store, settings, customer_account, agent, new_job, ["gguf:q4_k_m"])
    agent.upload_export(lease_id, "gguf:q4_k_m", gguf_file(tmp_path / "q8.gguf", fmt="gguf:q8_0").read_bytes())
    agent.complete_export(lease_id)
    session.expire_all()
    lease = session.get(LeaseModel, lease_id)
    assert lease is not None and lease.status is LeaseStatus.failed and "not a Q4_K_M file" in (lease.end_reason or "")
    again = session.get(JobModel, export.id)
    assert again is not None and again.status is JobStatus.queued and again.attempts == 1 and not again.result_files
    assert agent.worker.failed_checks == 1
    assert session.query(UsageRecordModel).filter_by(lease_id=lease_id).one().charge_micros == 0


def test_a_worker_uploads_only_what_its_export_asks_and_completes_only_after(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent], new_job: NewJob, tmp_path: Path,
) -> None:
    agent = service_agent()
    _, _, lease_id = _export_lease(session, store, settings, customer_account, agent, new_job, ["merged"])
    with pytest.raises(InvalidRequest) as not_asked:
        agent.upload_export(lease_id, "gguf:f16", gguf_file(tmp_path / "f.gguf", fmt="gguf:f16").read_bytes())
    assert not_asked.value.code == "format_not_asked"
    with pytest.raises(Conflict) as early:
        agent.complete_export(lease_id)
    assert early.value.code == "export_missing"
    with pytest.raises(Conflict) as wrong:  # an export lease trains nothing: no adapter, no checkpoint
        agent.upload_adapter(lease_id, b"x")
    assert wrong.value.code == "wrong_lease_kind"


def test_a_training_lease_cannot_upload_an_export(
    session: Session, service_agent: Callable[..., ServiceAgent], new_job: NewJob,
) -> None:
    agent = service_agent()
    new_job()
    a = agent.claim(kinds=KINDS)
    assert a is not None and a.kind == "train"
    with pytest.raises(Conflict) as wrong:
        agent.upload_export(a.lease_id, "merged", merged_archive())
    assert wrong.value.code == "wrong_lease_kind"

"""`services/results.py` on a real database: a lease's checked adapter becomes the customer's result file (its
bytes linked before the commit), the job is named `ft:...` and succeeds, and the event names the file."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.tables import FileModel, JobEventModel, JobModel, JobStatus, LeaseModel
from coordinator.services import files, results
from coordinator.storage import BlobStore
from tests.fakes import ServiceAgent, adapter_archive, sha256


def test_the_adapter_becomes_the_customers_result_file_and_the_job_succeeds(
    session: Session, store: BlobStore, service_agent: Callable[..., ServiceAgent],
    new_job: Callable[..., JobModel],
) -> None:
    agent = service_agent()
    job = new_job(suffix="mine")
    a = agent.claim()
    assert a is not None
    agent.progress(a.lease_id)
    adapter = adapter_archive()
    agent.upload_adapter(a.lease_id, adapter)
    lease = session.get(LeaseModel, a.lease_id, populate_existing=True)
    row = session.get(JobModel, job.id, populate_existing=True)
    assert lease is not None and row is not None
    lease.result = {"trained_tokens": 1234}
    file = results.deliver(session=session, store=store, job=row, lease=lease, how="; it passed", data={"x": 1})
    session.commit()
    session.expire_all()
    stored = session.get(FileModel, file.id)
    assert stored is not None and stored.account_id == job.account_id and stored.purpose == "fine-tune-results"
    assert stored.sha256 == sha256(adapter) and store.path(files.blob_key(file.id)).read_bytes() == adapter
    done = session.get(JobModel, job.id)
    assert done is not None and done.status is JobStatus.succeeded and done.result_files == [file.id]
    assert done.fine_tuned_model == f"ft:{job.model}:{job.account_id}:mine:{job.id}" and done.trained_tokens == 1234
    event = session.scalars(select(JobEventModel).where(JobEventModel.job_id == job.id)
                            .order_by(JobEventModel.id.desc()).limit(1)).one()
    assert event.message == f"The job has successfully completed with adapter {file.id}; it passed"
    assert event.data == {"status": "succeeded", "x": 1, "result_file": file.id}

"""`services/batches.py` on a real database: a batch of a `batch` file is a held job of its own with a row per
request, against a base model or the caller's fine-tune (its adapter kept under the batch's name); a bad file or
model is a clear 400, another's batch a 404; cancelling or expiring writes what was answered to the output file."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, BatchRequestModel, FileModel, JobModel, JobStatus
from coordinator.services import batches, files, jobs
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from shared.errors import InvalidRequest, NotFound
from shared.schemas.batches import BatchCreate
from tests.coordinator.services.test_exports import succeeded
from tests.coordinator.services.test_jobs import other_customer_account
from tests.fakes import ServiceAgent, batch_answer, batch_lines

NewJob = Callable[..., JobModel]
KINDS = ["train", "verify", "export", "batch"]


def batch_file(session: Session, store: BlobStore, settings: CoordinatorSettings, account: AccountModel,
               data: bytes) -> FileModel:
    return files.upload(session=session, store=store, account=account, filename="batch.jsonl", purpose="batch",
                        source=io.BytesIO(data), max_bytes=settings.max_upload_bytes,
                        min_examples=settings.min_training_examples, retention=timedelta(days=1))


def new_batch(session: Session, store: BlobStore, settings: CoordinatorSettings, account: AccountModel,
              data: bytes, **fields: object) -> JobModel:
    file = batch_file(session, store, settings, account, data)
    request = BatchCreate.model_validate({"input_file_id": file.id, "endpoint": "/v1/chat/completions",
                                          "completion_window": "24h", **fields})
    return batches.create(session=session, store=store, account=account, request=request, settings=settings)


def test_a_batch_of_a_base_model_is_a_held_job_with_a_row_per_request(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
) -> None:
    batch = new_batch(session, store, settings, customer_account, batch_lines(5), metadata={"run": "1"})
    assert (batch.kind, batch.stage, batch.status, batches.status_name(batch)) == ("batch", "batch", JobStatus.queued,
                                                                                  "in_progress")
    assert batch.id.startswith("batch_") and batch.held_micros > 0 and batch.initial_adapter is None
    rows = session.query(BatchRequestModel).filter_by(job_id=batch.id).order_by(BatchRequestModel.line).all()
    assert [(r.custom_id, r.line, r.max_tokens, r.status) for r in rows] == [
        (f"req-{i}", i + 1, 16, "pending") for i in range(5)]
    view = batches.view(session=session, account=customer_account, batch_id=batch.id)
    assert view.counts == {"total": 5, "completed": 0, "failed": 0}
    assert batch.job_metadata == {"run": "1"} and batch.batch["model"] == "tunegrid/tiny-llama"  # type: ignore[index]
    listed, _ = jobs.list_jobs(session=session, account=customer_account, after=None, limit=10, metadata=None)
    assert listed == []  # a batch is not a fine-tuning job


def test_a_batch_of_a_fine_tune_loads_its_adapter(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent], new_job: NewJob,
) -> None:
    agent = service_agent()
    job = succeeded(session, agent, new_job, suffix="bot")
    batch = new_batch(session, store, settings, customer_account, batch_lines(3, model=job.fine_tuned_model))  # type: ignore[arg-type]
    assert batch.initial_model == job.fine_tuned_model and batch.lora == job.lora
    assert batch.initial_adapter["member"] == "adapter/adapter_model.safetensors"  # type: ignore[index]
    a = agent.claim(kinds=KINDS)
    assert a is not None and (a.kind, a.job_id) == ("batch", batch.id) and a.spec.initial_adapter
    assert a.training_file_url == f"/v1/workers/leases/{a.lease_id}/files/training"
    assert a.batch_done_url == f"/v1/workers/leases/{a.lease_id}/files/batch_done"


def test_what_cannot_run_as_a_batch_is_a_clear_400(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    dataset: str, make_caller,  # type: ignore[no-untyped-def]
) -> None:
    def refused(**fields: object) -> InvalidRequest:
        request = BatchCreate.model_validate({"endpoint": "/v1/chat/completions", "completion_window": "24h", **fields})
        with pytest.raises(InvalidRequest) as caught:
            batches.create(session=session, store=store, account=customer_account, request=request, settings=settings)
        session.rollback()
        return caught.value

    good = batch_file(session, store, settings, customer_account, batch_lines(2))
    assert refused(input_file_id=dataset).code == "invalid_file"  # a fine-tune file
    assert refused(input_file_id="file-nope").code == "file_not_found"
    assert refused(input_file_id=good.id, endpoint="/v1/embeddings").param == "endpoint"
    assert refused(input_file_id=good.id, completion_window="1h").param == "completion_window"
    nobody = batch_file(session, store, settings, customer_account, batch_lines(2, model="gpt-9"))
    assert refused(input_file_id=nobody.id).code == "model_not_found"
    stranger = batch_file(session, store, settings, customer_account,
                          batch_lines(2, model="ft:tunegrid/tiny-llama:acct:x:ftjob-nope"))
    assert refused(input_file_id=stranger.id).code == "model_not_found"
    bob = other_customer_account(session, make_caller)
    with pytest.raises(InvalidRequest):  # someone else's file is as missing as a missing one
        batches.create(session=session, store=store, account=bob, settings=settings, request=BatchCreate.model_validate(
            {"input_file_id": good.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
    session.rollback()
    batch = new_batch(session, store, settings, customer_account, batch_lines(2))
    with pytest.raises(NotFound):
        batches.get(session=session, account=bob, batch_id=batch.id)


def test_cancel_writes_what_was_answered_and_ends_the_lease(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent],
) -> None:
    agent = service_agent()
    batch = new_batch(session, store, settings, customer_account, batch_lines(4))
    a = agent.claim(kinds=KINDS)
    assert a is not None and a.job_id == batch.id
    agent.events(a.lease_id, {"type": "started", "total_steps": 4, "message": "Batch started on cpu"})
    agent.upload_batch_part(a.lease_id, [batch_answer("req-2", "four")])
    done = batches.cancel(session=session, store=store, account=customer_account, batch_id=batch.id)
    assert done.status is JobStatus.cancelled and batches.status_name(done) == "cancelled" and done.held_micros == 0
    output = session.get(FileModel, done.batch["output_file_id"])  # type: ignore[index]
    assert output is not None and output.purpose == "batch_output"
    lines = [json.loads(x) for x in store.path(files.blob_key(output.id)).read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == ["req-2"]
    assert lines[0]["response"]["body"]["choices"][0]["message"]["content"] == "four"
    assert done.batch["error_file_id"] is None and done.batch["counts"]["completed"] == 1  # type: ignore[index]
    with pytest.raises(InvalidRequest):
        batches.cancel(session=session, store=store, account=customer_account, batch_id=batch.id) and None
        done.status = JobStatus.succeeded
        session.commit()
        batches.cancel(session=session, store=store, account=customer_account, batch_id=batch.id)


def test_a_batch_past_its_window_expires_with_its_answers_so_far(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
) -> None:
    from coordinator.db.tables import utcnow  # noqa: PLC0415

    batch = new_batch(session, store, settings, customer_account, batch_lines(2))
    assert batches.expire(session=session, store=store) == 0
    assert batches.expire(session=session, store=store, now=utcnow() + timedelta(hours=25)) == 1
    session.expire_all()
    done = session.get(JobModel, batch.id)
    assert done is not None and batches.status_name(done) == "expired" and done.error["code"] == "batch_expired"  # type: ignore[index]
    assert done.held_micros == 0 and done.batch["output_file_id"] is None  # type: ignore[index]

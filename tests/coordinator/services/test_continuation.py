"""`services/continuation.py` on a real database: a job continues the customer's own fine-tune or checkpoint (same
base, same LoRA shape, its adapter kept under the job's own name), checkpoints are named after the job's
fine-tuned model, and anyone else's name is the same 400 as a missing one."""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, JobCheckpointModel, JobModel, JobStatus
from coordinator.services import files, jobs, leases
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from shared.errors import InvalidRequest
from shared.schemas.jobs import JobCreate
from tests.conftest import chat_lines, jsonl
from tests.coordinator.services.test_jobs import other_customer_account
from tests.fakes import ServiceAgent, sha256

NewJob = Callable[..., JobModel]


def _succeeded(session: Session, agent: ServiceAgent, new_job: NewJob, **fields: object) -> JobModel:
    job = new_job(**fields)
    a = agent.claim()
    assert a is not None and a.job_id == job.id
    agent.finish(a.lease_id)
    done = session.get(JobModel, job.id, populate_existing=True)
    assert done is not None and done.status is JobStatus.succeeded, done.status
    return done


def test_a_job_continues_the_customers_fine_tune_from_its_adapter(
    session: Session, store: BlobStore, service_agent: Callable[..., ServiceAgent], new_job: NewJob,
) -> None:
    agent = service_agent()
    first = _succeeded(session, agent, new_job, suffix="v1")
    assert first.fine_tuned_model == f"ft:tunegrid/tiny-llama:{first.account_id}:v1:{first.id}"
    second = new_job(model=first.fine_tuned_model, suffix="v2")
    assert second.status is JobStatus.queued and second.model == "tunegrid/tiny-llama"
    assert second.initial_model == first.fine_tuned_model and second.lora == first.lora
    result = session.get(files.FileModel, first.result_files[0])
    assert second.initial_adapter == {"key": f"jobs/{second.id}/initial", "sha256": result.sha256,  # type: ignore[union-attr]
                                      "member": "adapter/adapter_model.safetensors", "job_id": first.id, "step": None}
    a = agent.claim()
    assert a is not None and a.job_id == second.id and a.spec.initial_adapter
    assert (a.initial_adapter_url, a.initial_adapter_member) == (
        f"/v1/workers/leases/{a.lease_id}/files/initial", "adapter/adapter_model.safetensors")
    found = leases.lease_input(session=session, worker=agent.worker, lease_id=a.lease_id,
                               fencing_token=a.fencing_token, which="initial")
    assert sha256(store.path(found.key).read_bytes()) == found.sha256 == a.initial_adapter_sha256
    # The earlier result can be deleted now: the continued job keeps its own name for the bytes.
    files.delete(session=session, store=store, account=session.get(AccountModel, first.account_id),  # type: ignore[arg-type]
                 file_id=first.result_files[0])
    assert store.path(found.key).is_file()
    with pytest.raises(InvalidRequest, match="was deleted") as gone:
        new_job(model=first.fine_tuned_model)
    assert gone.value.param == "model"


def test_a_job_continues_from_a_checkpoint_by_its_name(
    session: Session, service_agent: Callable[..., ServiceAgent], new_job: NewJob,
) -> None:
    agent = service_agent()
    job = new_job(suffix="run")
    a = agent.claim()
    assert a is not None
    agent.progress(a.lease_id, step=2)
    checkpoint = agent.upload_checkpoint(a.lease_id, 2, agent.checkpoint_for(a.lease_id, 2))
    session.expire_all()
    assert checkpoint.fine_tuned_model_checkpoint == f"ft:tunegrid/tiny-llama:{job.account_id}:run:{job.id}:ckpt-step-2"
    agent.finish(a.lease_id)
    done = session.get(JobModel, job.id, populate_existing=True)
    assert done is not None and checkpoint.fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-2"
    continued = new_job(model=checkpoint.fine_tuned_model_checkpoint, method={"type": "supervised"})
    assert continued.initial_adapter["member"] == "resume/adapter_model.safetensors"  # type: ignore[index]
    assert continued.initial_adapter["step"] == 2 and continued.initial_adapter["sha256"] == checkpoint.blob_sha256  # type: ignore[index]
    row = session.get(JobCheckpointModel, checkpoint.id)
    row.blob_sha256 = None  # type: ignore[union-attr] - pruned: its content is gone
    session.commit()
    with pytest.raises(InvalidRequest) as pruned:
        new_job(model=checkpoint.fine_tuned_model_checkpoint)
    assert pruned.value.code == "checkpoint_not_available"


def test_another_customers_or_an_unfinished_fine_tune_is_not_found(
    session: Session, store: BlobStore, settings: CoordinatorSettings, make_caller,  # type: ignore[no-untyped-def]
    service_agent: Callable[..., ServiceAgent], new_job: NewJob,
) -> None:
    agent = service_agent()
    first = _succeeded(session, agent, new_job)
    bob = other_customer_account(session, make_caller)
    bobs_file = files.upload(session=session, store=store, account=bob, filename="t.jsonl", purpose="fine-tune",
                             source=io.BytesIO(jsonl(chat_lines())), max_bytes=settings.max_upload_bytes,
                             min_examples=settings.min_training_examples, retention=timedelta(days=1))
    for name in (first.fine_tuned_model, f"{first.fine_tuned_model}:ckpt-step-1"):
        with pytest.raises(InvalidRequest) as refused:
            jobs.create(session=session, store=store, account=bob, settings=settings,
                        request=JobCreate.model_validate({"model": name, "training_file": bobs_file.id}))
        assert (refused.value.param, refused.value.code) == ("model", "model_not_found")
    running = new_job(suffix="later")
    with pytest.raises(InvalidRequest) as unfinished:
        new_job(model=f"ft:tunegrid/tiny-llama:{running.account_id}:later:{running.id}")
    assert unfinished.value.code == "model_not_found"


def test_a_continued_job_keeps_the_lora_shape(
    session: Session, service_agent: Callable[..., ServiceAgent], new_job: NewJob,
) -> None:
    first = _succeeded(session, service_agent(), new_job)
    with pytest.raises(InvalidRequest) as mismatch:
        new_job(model=first.fine_tuned_model, lora={"r": 4})
    assert (mismatch.value.param, mismatch.value.code) == ("lora", "lora_mismatch")
    same = new_job(model=first.fine_tuned_model, lora={"r": first.lora["r"], "dropout": 0.2})
    assert same.lora == {**first.lora, "dropout": 0.2}

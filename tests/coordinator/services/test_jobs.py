"""`services/jobs.py` on a real database: creating a job (its file checked, its estimate held, queued), someone
else's job or file being a 404, listing with metadata filters, and the customer's cancel, pause and resume,
which end a running lease and hold again. Request validation and the OpenAI shapes: api/test_jobs.py."""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, Book, JobEventModel, JobModel, JobStatus, LeaseModel, LeaseStatus
from coordinator.services import files, jobs, leases, ledger
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from shared.errors import InvalidRequest, NotFound, InsufficientQuota
from shared.schemas.jobs import JobCreate
from tests.conftest import STARTING_CREDIT_USD, chat_lines, jsonl, preference_lines, tool_chat_lines
from shared.money import usd_to_micros
from tests.fakes import ServiceAgent

NewJob = Callable[..., JobModel]


def other_customer_account(session: Session, make_caller, credit: str | None = "100") -> AccountModel:  # type: ignore[no-untyped-def]
    account = session.get(AccountModel, make_caller("customer", "bob", credit=credit).account_id)
    assert account is not None
    return account


def test_a_new_job_is_queued_with_its_estimate_held(new_job: NewJob, session: Session, customer_account: AccountModel) -> None:
    job = new_job(suffix="sums", seed=7, metadata={"team": "a"})
    assert job.status is JobStatus.queued and job.seed == 7 and job.held_micros > 0
    available = ledger.balance(session, Book.customer_available, customer_account.id)
    assert available == usd_to_micros(STARTING_CREDIT_USD) - job.held_micros
    messages = [e.message for e in session.scalars(select(JobEventModel).where(JobEventModel.job_id == job.id)
                                                   .order_by(JobEventModel.id))]
    assert messages[0] == "Created fine-tuning job" and messages[-1].startswith("Fine-tuning job queued; $")


def test_a_job_the_balance_cannot_cover_is_refused_and_nothing_is_kept(session: Session, make_caller, store,  # type: ignore[no-untyped-def]
                                                                        settings: CoordinatorSettings) -> None:
    poor = other_customer_account(session, make_caller, credit=None)
    own = files.upload(session=session, store=store, account=poor, filename="t.jsonl", purpose="fine-tune",
                       source=io.BytesIO(jsonl(chat_lines())), max_bytes=settings.max_upload_bytes,
                       min_examples=settings.min_training_examples, retention=timedelta(days=1))
    with pytest.raises(InsufficientQuota):
        jobs.create(session=session, store=store, account=poor, settings=settings,
                    request=JobCreate.model_validate({"model": "tunegrid/tiny-llama", "training_file": own.id}))
    session.rollback()
    assert session.scalars(select(JobModel).where(JobModel.account_id == poor.id)).all() == []


def test_someone_elses_file_or_job_is_the_same_404_as_a_missing_one(new_job: NewJob, session: Session, make_caller,  # type: ignore[no-untyped-def]
                                                                   dataset: str, settings: CoordinatorSettings,
                                                                   store: BlobStore) -> None:
    job = new_job()
    bob = other_customer_account(session, make_caller)
    with pytest.raises(InvalidRequest) as missing_file:
        jobs.create(session=session, store=store, account=bob, settings=settings,
                    request=JobCreate.model_validate({"model": "tunegrid/tiny-llama", "training_file": dataset}))
    assert (missing_file.value.param, missing_file.value.code) == ("training_file", "file_not_found")
    for call in (jobs.get, jobs.cancel, jobs.pause):
        with pytest.raises(NotFound):
            call(session=session, account=bob, job_id=job.id)


def test_jobs_list_newest_first_filtered_by_metadata(new_job: NewJob, session: Session, customer_account: AccountModel) -> None:
    a = new_job(metadata={"team": "a", 'k"ey': "x/y"})
    b = new_job(metadata={"team": "b"})
    rows, _ = jobs.list_jobs(session=session, account=customer_account, after=None, limit=10, metadata=None)
    assert [j.id for j in rows] == [b.id, a.id]
    assert [j.id for j in jobs.list_jobs(session=session, account=customer_account, after=None, limit=10,
                                         metadata={"team": "a"})[0]] == [a.id]
    assert [j.id for j in jobs.list_jobs(session=session, account=customer_account, after=None, limit=10,
                                         metadata={'k"ey': "x/y"})[0]] == [a.id]


def test_pausing_a_running_job_ends_its_lease_and_releases_the_hold_and_resume_holds_again(
    new_job: NewJob, service_agent, session: Session, customer_account: AccountModel, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
) -> None:
    agent: ServiceAgent = service_agent()
    job = new_job()
    a = agent.claim()
    assert a is not None
    paused = jobs.pause(session=session, account=customer_account, job_id=job.id)
    assert paused.status is JobStatus.paused and paused.held_micros == 0
    lease = session.get(LeaseModel, a.lease_id)
    assert lease is not None and lease.status is LeaseStatus.cancelled
    assert jobs.pause(session=session, account=customer_account, job_id=job.id).status is JobStatus.paused  # twice: same
    resumed = jobs.resume(session=session, account=customer_account, job_id=job.id, settings=settings)
    assert resumed.status is JobStatus.queued and resumed.held_micros > 0
    again = agent.claim()
    assert again is not None and again.fencing_token == 2


def test_cancel_is_final_and_idempotent(new_job: NewJob, session: Session, customer_account: AccountModel,
                                        settings: CoordinatorSettings) -> None:
    job = new_job()
    assert jobs.cancel(session=session, account=customer_account, job_id=job.id).status is JobStatus.cancelled
    assert jobs.cancel(session=session, account=customer_account, job_id=job.id).status is JobStatus.cancelled
    for call in (jobs.pause, lambda **kw: jobs.resume(settings=settings, **kw)):
        with pytest.raises(InvalidRequest) as conflict:  # OpenAI's 400, not a 409
            call(session=session, account=customer_account, job_id=job.id)
        assert conflict.value.code == "invalid_job_state" and conflict.value.http_status == 400


# -- training methods and data formats -------------------------------------------------------------------------------
def _file(session: Session, store: BlobStore, settings: CoordinatorSettings, account: AccountModel,
          lines: list[str]) -> str:
    return files.upload(session=session, store=store, account=account, filename="data.jsonl", purpose="fine-tune",
                        source=io.BytesIO(jsonl(lines)), max_bytes=settings.max_upload_bytes,
                        min_examples=settings.min_training_examples, retention=timedelta(days=1)).id


def test_a_dpo_job_trains_preference_pairs_and_is_priced_for_its_reference_pass(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel, new_job: NewJob,
) -> None:
    pairs = _file(session, store, settings, customer_account, preference_lines())
    job = new_job(training_file=pairs, method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2,
                                                                                           "n_epochs": 2}}})
    per_epoch = session.get(files.FileModel, pairs).estimated_tokens  # type: ignore[union-attr]
    assert job.method == "dpo" and job.hyperparameters["beta"] == 0.2
    assert job.estimated_tokens == 2 * per_epoch + -(-per_epoch // 3)  # two epochs and the reference pass
    spec = leases.job_spec(job)
    assert spec.method == "dpo" and spec.hyperparameters.beta == 0.2
    assert spec.hyperparameters.learning_rate == leases.DPO_LEARNING_RATE
    auto = new_job(training_file=pairs, method={"type": "dpo"})
    assert leases.job_spec(auto).hyperparameters.beta == leases.DPO_BETA
    with pytest.raises(InvalidRequest) as sft_on_pairs:
        new_job(training_file=pairs)
    assert (sft_on_pairs.value.param, sft_on_pairs.value.code) == ("training_file", "invalid_file_format")
    with pytest.raises(InvalidRequest) as mixed:
        new_job(training_file=pairs, validation_file=_file(session, store, settings, customer_account, chat_lines()),
                method={"type": "dpo"})
    assert mixed.value.param == "validation_file"


def test_tool_data_trains_only_on_models_whose_template_has_tools(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel, new_job: NewJob,
) -> None:
    tools = _file(session, store, settings, customer_account, tool_chat_lines())
    assert session.get(files.FileModel, tools).uses_tools  # type: ignore[union-attr]
    assert new_job(training_file=tools).status is JobStatus.queued
    with pytest.raises(InvalidRequest) as refused:
        new_job(training_file=tools, model="gemma-2-2b-it")
    assert (refused.value.param, refused.value.code) == ("model", "model_cannot_use_tools")
    assert "gemma-2-2b-it" in refused.value.message and "qwen2.5-7b-instruct" in refused.value.message


def test_early_stopping_is_kept_on_the_job_and_reaches_the_trainer(new_job: NewJob) -> None:
    with pytest.raises(InvalidRequest) as no_validation:
        new_job(early_stopping={"patience": 3})
    assert no_validation.value.code == "early_stopping_needs_validation"
    job = new_job(early_stopping={"patience": 3}, validation_file=new_job().training_file_id)
    assert job.early_stopping == {"patience": 3} and leases.job_spec(job).early_stopping_patience == 3


def test_a_job_is_validating_files_until_its_checks_queue_it(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel, dataset: str,
) -> None:
    request = JobCreate.model_validate({"model": "tunegrid/tiny-llama", "training_file": dataset})
    job = jobs.create(session=session, store=store, account=customer_account, request=request, settings=settings)
    assert job.status is JobStatus.validating_files and job.held_micros > 0  # held at once: 429 answers at create
    assert jobs.finish_validation(session=session, store=store, job_id=job.id).status is JobStatus.queued  # type: ignore[union-attr]
    assert jobs.finish_validation(session=session, store=store, job_id=job.id).status is JobStatus.queued  # type: ignore[union-attr]
    # A job cancelled while validating stays cancelled, its hold released; a straggler is validated by the sweep.
    cancelled = jobs.create(session=session, store=store, account=customer_account, request=request, settings=settings)
    assert jobs.cancel(session=session, account=customer_account, job_id=cancelled.id).held_micros == 0
    assert jobs.finish_validation(session=session, store=store, job_id=cancelled.id).status is JobStatus.cancelled  # type: ignore[union-attr]
    left = jobs.create(session=session, store=store, account=customer_account, request=request, settings=settings)
    assert jobs.validate_waiting(session=session, store=store, older_than=timedelta(hours=1)) == 0
    assert jobs.validate_waiting(session=session, store=store, older_than=timedelta(0)) == 1
    assert session.get(JobModel, left.id, populate_existing=True).status is JobStatus.queued  # type: ignore[union-attr]
    with pytest.raises(InvalidRequest):  # not placeable while validating: it cannot be paused either
        jobs.pause(session=session, account=customer_account,
                   job_id=jobs.create(session=session, store=store, account=customer_account, request=request,
                                      settings=settings).id)


def test_a_job_no_gpu_could_hold_is_refused_at_once_and_nothing_is_kept(
        new_job: NewJob, session: Session, customer_account: AccountModel) -> None:
    """Placement sizes a job's memory by its micro-batch (shared/memory.py); one past the largest GPU on the market
    would wait in the queue for ever with its cost held: it is a 400 naming what to lower instead."""
    before = session.scalars(select(JobModel).where(JobModel.account_id == customer_account.id)).all()
    with pytest.raises(InvalidRequest) as refused:
        new_job(model="llama-3.1-8b-instruct", hyperparameters={"batch_size": 256})
    assert refused.value.code == "job_too_large_for_any_gpu" and refused.value.param == "hyperparameters.batch_size"
    assert "Lower hyperparameters.batch_size" in refused.value.message
    session.rollback()
    assert session.scalars(select(JobModel).where(JobModel.account_id == customer_account.id)).all() == before
    assert ledger.balance(session, Book.customer_held, customer_account.id) == 0
    assert new_job(model="llama-3.1-8b-instruct", hyperparameters={"batch_size": 8}).status is JobStatus.queued

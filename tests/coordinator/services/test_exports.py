"""`services/exports.py` (and the rows of `export_rows.py`) on a real database: an export of a succeeded fine-tune
or of one of its checkpoints is a job of its own, held up front and placed only on a worker whose agent runs
exports; one asked for at creation is queued when the job succeeds and held by the budgets sweep; exports are
the caller's own and never listed as fine-tuning jobs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, JobKind, JobModel, JobStatus, LeaseModel
from coordinator.services import budgets, exports, jobs, leases, ledger
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from shared.errors import InsufficientQuota, InvalidRequest, NotFound
from shared.schemas.exports import ExportCreate
from tests.coordinator.services.test_jobs import other_customer_account
from tests.fakes import ServiceAgent

NewJob = Callable[..., JobModel]
KINDS = ["train", "verify", "export"]


def succeeded(session: Session, agent: ServiceAgent, new_job: NewJob, *, checkpoint: bool = False,
              **fields: object) -> JobModel:
    job = new_job(**fields)
    a = agent.claim()
    assert a is not None and a.job_id == job.id
    if checkpoint:
        agent.progress(a.lease_id, step=2)
        agent.upload_checkpoint(a.lease_id, 2, agent.checkpoint_for(a.lease_id, 2))
    agent.finish(a.lease_id)
    done = session.get(JobModel, job.id, populate_existing=True)
    assert done is not None and done.status is JobStatus.succeeded
    return done


def request(session: Session, store: BlobStore, settings: CoordinatorSettings, account: AccountModel, job: JobModel,
            **fields: object) -> JobModel:
    return exports.create(session=session, store=store, account=account, job_id=job.id, settings=settings,
                          request=ExportCreate.model_validate({"formats": ["merged"], **fields}))


def test_an_export_of_a_fine_tune_is_a_held_job_of_its_own_placed_on_an_exporting_worker(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent], new_job: NewJob,
) -> None:
    agent = service_agent()
    job = succeeded(session, agent, new_job)
    export = request(session, store, settings, customer_account, job, formats=["gguf:q4_k_m", "merged"])
    assert (export.kind, export.parent_job_id, export.status, export.stage) == ("export", job.id, JobStatus.queued,
                                                                               "export")
    assert export.export == {"formats": ["merged", "gguf:q4_k_m"], "model": job.fine_tuned_model, "step": None,
                             "files": []}
    assert export.held_micros > 0 and export.initial_adapter["key"] == f"jobs/{export.id}/initial"  # type: ignore[index]
    assert store.path(f"jobs/{export.id}/initial").is_file()
    assert agent.claim() is None  # this agent claims training only: an older agent never gets an export
    a = agent.claim(kinds=KINDS)
    assert a is not None and (a.job_id, a.kind) == (export.id, "export")
    assert a.spec.kind == "export" and a.spec.export == ["merged", "gguf:q4_k_m"]
    assert a.spec.export_name == job.fine_tuned_model
    assert a.training_file_url is None and a.validation_file_url is None
    assert a.initial_adapter_url == f"/v1/workers/leases/{a.lease_id}/files/initial"
    with pytest.raises(NotFound):  # an export trains nothing: the training data is not its input
        leases.lease_input(session=session, worker=agent.worker, lease_id=a.lease_id, fencing_token=a.fencing_token,
                           which="training")
    listed, _ = jobs.list_jobs(session=session, account=customer_account, after=None, limit=100, metadata=None)
    assert [j.id for j in listed] == [job.id]
    with pytest.raises(NotFound):
        jobs.get(session=session, account=customer_account, job_id=export.id)
    found, _ = exports.list_exports(session=session, account=customer_account, job_id=job.id, after=None, limit=10)
    assert [e.id for e in found] == [export.id]


def test_a_checkpoint_is_exported_by_its_id_or_its_name(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent], new_job: NewJob,
) -> None:
    from coordinator.db.tables import JobCheckpointModel  # noqa: PLC0415

    job = succeeded(session, service_agent(), new_job, checkpoint=True)
    checkpoint = session.query(JobCheckpointModel).filter_by(job_id=job.id).one()
    by_id = request(session, store, settings, customer_account, job, checkpoint=checkpoint.id)
    by_name = request(session, store, settings, customer_account, job, checkpoint=checkpoint.fine_tuned_model_checkpoint)
    for export in (by_id, by_name):
        assert export.export["step"] == 2 and export.export["model"] == checkpoint.fine_tuned_model_checkpoint  # type: ignore[index]
        assert export.initial_adapter["member"] == "resume/adapter_model.safetensors"  # type: ignore[index]
    with pytest.raises(InvalidRequest) as unknown:
        request(session, store, settings, customer_account, job, checkpoint="ftckpt-nope")
    assert (unknown.value.code, unknown.value.param) == ("checkpoint_not_found", "checkpoint")
    checkpoint.blob_sha256 = None  # pruned
    session.commit()
    with pytest.raises(InvalidRequest) as pruned:
        request(session, store, settings, customer_account, job, checkpoint=checkpoint.id)
    assert pruned.value.code == "checkpoint_not_available"


def test_what_cannot_be_exported_is_a_clear_400_and_anothers_job_a_404(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    make_caller, service_agent: Callable[..., ServiceAgent], new_job: NewJob,  # type: ignore[no-untyped-def]
) -> None:
    job = succeeded(session, service_agent(), new_job)
    running = new_job()
    with pytest.raises(InvalidRequest) as unfinished:
        request(session, store, settings, customer_account, running)
    assert unfinished.value.code == "invalid_job_state"
    bob = other_customer_account(session, make_caller)
    with pytest.raises(NotFound):
        exports.create(session=session, store=store, account=bob, job_id=job.id, settings=settings,
                       request=ExportCreate.model_validate({"formats": ["merged"]}))
    export = request(session, store, settings, customer_account, job)
    with pytest.raises(NotFound):
        exports.get(session=session, account=bob, job_id=job.id, export_id=export.id)
    with pytest.raises(NotFound):  # an export is reached through its own job only
        exports.get(session=session, account=customer_account, job_id=running.id, export_id=export.id)


def test_an_export_the_balance_cannot_cover_is_refused_with_nothing_left_behind(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent], new_job: NewJob,
) -> None:
    job = succeeded(session, service_agent(), new_job)
    from coordinator.db.tables import Book  # noqa: PLC0415

    available = ledger.balance(session, Book.customer_available, customer_account.id)
    ledger.move(session=session, key="drain", kind="grant", amount=available, frm=(Book.customer_available,
                customer_account.id), to=(Book.platform_grants, ""), description="drain", account_id=customer_account.id)
    session.commit()
    with pytest.raises(InsufficientQuota):
        request(session, store, settings, customer_account, job)
    session.rollback()
    assert session.query(JobModel).filter_by(kind=JobKind.export.value).count() == 0


def test_an_export_asked_for_at_creation_is_queued_when_the_job_succeeds_and_held_by_the_sweep(
    session: Session, settings: CoordinatorSettings, service_agent: Callable[..., ServiceAgent], new_job: NewJob,
) -> None:
    job = succeeded(session, service_agent(), new_job, export=["gguf:q8_0", "merged"])
    assert job.export["formats"] == ["merged", "gguf:q8_0"]  # type: ignore[index]
    export = session.get(JobModel, job.export["export_id"])  # type: ignore[index]
    assert export is not None and export.status is JobStatus.queued and export.held_micros == 0
    assert export.export["model"] == job.fine_tuned_model  # type: ignore[index]
    counts = budgets.enforce_budgets(session=session, settings=settings)
    assert counts["reheld"] == 1
    session.refresh(export)
    assert export.held_micros > 0


def test_a_cancelled_export_ends_its_lease(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent], new_job: NewJob,
) -> None:
    agent = service_agent()
    job = succeeded(session, agent, new_job)
    export = request(session, store, settings, customer_account, job)
    a = agent.claim(kinds=KINDS)
    assert a is not None and a.job_id == export.id
    cancelled = exports.cancel(session=session, account=customer_account, job_id=job.id, export_id=export.id)
    assert cancelled.status is JobStatus.cancelled and cancelled.held_micros == 0
    assert session.get(LeaseModel, a.lease_id).status.value == "cancelled"  # type: ignore[union-attr]
    with pytest.raises(InvalidRequest) as again:
        exports.cancel(session=session, account=customer_account, job_id=job.id, export_id=export.id) and None
        done = request(session, store, settings, customer_account, job)
        done.status = JobStatus.succeeded
        session.commit()
        exports.cancel(session=session, account=customer_account, job_id=job.id, export_id=done.id)
    assert again.value.code == "invalid_job_state"

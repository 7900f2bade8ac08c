"""Fixtures for service tests: accounts, a training file and jobs made through the services themselves (no app,
no HTTP), and workers that drive the lease protocol's services (`tests.fakes.ServiceAgent`)."""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, JobModel, Role
from coordinator.services import files, jobs
from coordinator.services.keys import create_account
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore, DiskStore
from shared.schemas.jobs import JobCreate
from tests.conftest import Caller, chat_lines, jsonl
from tests.fakes import ServiceAgent


def created(session: Session, store: BlobStore, settings: CoordinatorSettings, account: AccountModel,
            request: JobCreate) -> JobModel:
    """A job created and its files validated, as the API's create and the validation just after it leave it."""
    job = jobs.create(session=session, store=store, account=account, request=request, settings=settings)
    validated = jobs.finish_validation(session=session, store=store, job_id=job.id)
    assert validated is not None
    return validated


@pytest.fixture
def store(settings: CoordinatorSettings) -> BlobStore:
    return DiskStore(settings.resolved_storage_dir)


@pytest.fixture
def customer_account(session: Session, customer: Caller) -> AccountModel:
    account = session.get(AccountModel, customer.account_id)
    assert account is not None
    return account


@pytest.fixture
def provider_account(session: Session) -> AccountModel:
    return create_account(session=session, name="pat", role=Role.provider)


@pytest.fixture
def dataset(session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel) -> str:
    """A validated training file of the customer's, uploaded through the files service."""
    file = files.upload(session=session, store=store, account=customer_account, filename="train.jsonl",
                        purpose="fine-tune", source=io.BytesIO(jsonl(chat_lines())), max_bytes=settings.max_upload_bytes,
                        min_examples=settings.min_training_examples, retention=timedelta(days=1))
    return file.id


@pytest.fixture
def new_job(session: Session, settings: CoordinatorSettings, customer_account: AccountModel, store: BlobStore,
            dataset: str) -> Callable[..., JobModel]:
    """Jobs created (held and queued) through the service: no dispatcher runs, so only the test's claims place them."""
    def make(**fields: object) -> JobModel:
        request = JobCreate.model_validate({"model": "tunegrid/tiny-llama", "training_file": dataset, **fields})
        return created(session, store, settings, customer_account, request)
    return make


@pytest.fixture
def service_agent(session: Session, settings: CoordinatorSettings, store: BlobStore,
                  provider_account: AccountModel) -> Callable[..., ServiceAgent]:
    def register(machine_id: str = "pc-1", *, provider: AccountModel | None = None, **fields: object) -> ServiceAgent:
        return ServiceAgent.register(session, settings, store, provider or provider_account, machine_id, **fields)
    return register


@pytest.fixture
def new_provider(session: Session) -> Callable[[str], AccountModel]:
    """Another provider's account (a worker of theirs is independent of `provider_account`'s)."""
    return lambda name: create_account(session=session, name=name, role=Role.provider)


@pytest.fixture
def big_job(session: Session, store: BlobStore, settings: CoordinatorSettings,
            customer_account: AccountModel) -> Callable[..., JobModel]:
    """A job on 40 examples: 2 of them are kept back as its held-out sample."""
    file = files.upload(session=session, store=store, account=customer_account, filename="train.jsonl",
                        purpose="fine-tune", source=io.BytesIO(jsonl(chat_lines(40))), max_bytes=settings.max_upload_bytes,
                        min_examples=settings.min_training_examples, retention=timedelta(days=1))

    def make(**fields: object) -> JobModel:
        request = JobCreate.model_validate({"model": "tunegrid/tiny-llama", "training_file": file.id, **fields})
        return created(session, store, settings, customer_account, request)
    return make

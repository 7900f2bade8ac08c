"""Placement: who may take a job (memory, compute capability, price, trust, GPU filter, CPU for tiny
models only) and who wins among them (throughput per dollar, reliability, the model already cached)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, JobModel, JobStatus, LeaseModel, Role, WorkerModel, WorkerState, utcnow
from coordinator.services import workers
from coordinator.services.keys import create_account
from coordinator.services.placement import place_queued_jobs
from coordinator.settings import CoordinatorSettings
from shared.protocol import WorkerRegister
from shared.schemas.jobs import JobCreate
from tests.coordinator.services.conftest import created
from tests.fakes import gpu, registration

GIB = 1024**3


@pytest.fixture
def provider(session: Session):  # type: ignore[no-untyped-def]
    return create_account(session=session, name="pat", role=Role.provider)


@pytest.fixture
def add_worker(session: Session, provider):  # type: ignore[no-untyped-def]
    def add(name: str, *, card: str = "NVIDIA GeForce RTX 4090", gb: int = 24, cc: str = "8.9", price: str = "0.30",
            cached: tuple[str, ...] = (), trusted: bool = False, reliability: float = 0.9, cpu_gb: int | None = None) -> WorkerModel:
        body = registration(name, price=price, gpus=[] if cpu_gb else [gpu(card, gb, cc, uuid=f"GPU-{name}")],
                            cpu={"cores": 8, "memory_bytes": cpu_gb * GIB} if cpu_gb else None, cached_models=list(cached))
        worker, _ = workers.register(session=session, account=provider, request=WorkerRegister.model_validate(body),
                                     protocol_version=1, max_workers=100)
        worker.state, worker.available_until = WorkerState.idle, utcnow() + timedelta(seconds=30)
        worker.trusted, worker.reliability = trusted, reliability
        session.commit()
        return worker
    return add


@pytest.fixture
def queue(session: Session, settings, customer, training_file: str, store):  # type: ignore[no-untyped-def]
    """Jobs created through the service, so no dispatcher is kicked and no pass but the test's runs."""
    account = session.get(AccountModel, customer.account_id)

    def make(**fields) -> str:  # type: ignore[no-untyped-def]
        request = JobCreate.model_validate({"model": "tunegrid/tiny-llama", "training_file": training_file, **fields})
        return created(session, store, settings, account, request).id
    return make


def placed_on(session: Session, job_id: str) -> str | None:
    session.expire_all()
    lease = session.scalars(select(LeaseModel).where(LeaseModel.job_id == job_id)).first()
    return lease.worker_id if lease else None


def run_pass(session: Session, settings: CoordinatorSettings) -> int:
    return place_queued_jobs(session=session, settings=settings)


# These tests queue first, then add workers, then run the pass themselves.

def test_best_throughput_per_dollar_wins(session, settings, add_worker, queue) -> None:  # type: ignore[no-untyped-def]
    job = queue()
    add_worker("slow-cheap", card="NVIDIA GeForce RTX 3060", gb=12, cc="8.6", price="0.10")  # 0.40 / 0.12 = 3.3
    fast = add_worker("fast-fair", card="NVIDIA GeForce RTX 4090", price="0.35")  # 1.80 / 0.42 = 4.3
    add_worker("fast-dear", card="NVIDIA H100 80GB HBM3", gb=80, cc="9.0", price="2.50")  # 3.5 / 3.0 = 1.2
    assert run_pass(session, settings) == 1
    assert placed_on(session, job) == fast.id


def test_a_cached_model_tips_a_close_race(session, settings, add_worker, queue) -> None:  # type: ignore[no-untyped-def]
    job = queue()
    add_worker("a", price="0.30")
    cached = add_worker("b", price="0.33", cached=("tunegrid/tiny-llama",))
    run_pass(session, settings)
    assert placed_on(session, job) == cached.id


def test_unreliable_workers_rank_lower_and_are_skipped_below_the_floor(session, settings, add_worker, queue) -> None:  # type: ignore[no-untyped-def]
    first, second = queue(), queue()
    add_worker("flaky", price="0.20", reliability=0.1)  # below min_reliability: never placed
    shaky = add_worker("shaky", price="0.20", reliability=0.5)
    solid = add_worker("solid", price="0.25", reliability=0.95)
    run_pass(session, settings)
    assert placed_on(session, first) == solid.id and placed_on(session, second) == shaky.id


@pytest.mark.parametrize(("fields", "worker_kwargs", "placed"), [
    ({"max_price_per_gpu_hour": "0.35"}, {"price": "0.30"}, False),  # 0.30 + 20% fee = 0.36 > 0.35
    ({"max_price_per_gpu_hour": "0.36"}, {"price": "0.30"}, True),
    ({"trusted_hosts_only": True}, {}, False),
    ({"trusted_hosts_only": True}, {"trusted": True}, True),
    ({"min_vram_gb": 32}, {}, False),
    ({"gpu_filter": ["RTX 3090", "rtx-4090"]}, {}, True),
    ({"gpu_filter": ["A100"]}, {}, False),
    ({}, {"card": "NVIDIA GeForce GTX 1080 Ti", "cc": "6.1", "gb": 11}, False),  # no 4-bit kernels
    ({"model": "qwen2.5-7b-instruct"}, {"card": "NVIDIA GeForce RTX 3070", "gb": 8, "cc": "8.6"}, False),
    ({"model": "qwen2.5-7b-instruct"}, {"card": "NVIDIA GeForce RTX 4080", "gb": 16, "cc": "8.9"}, True),
    ({}, {"cpu_gb": 16}, True),  # the tiny model trains on a CPU worker
    ({"model": "qwen2.5-0.5b-instruct"}, {"cpu_gb": 64}, False),  # a real model never does
])
def test_eligibility(session, settings, add_worker, queue, fields, worker_kwargs, placed) -> None:  # type: ignore[no-untyped-def]
    job = queue(**fields)
    worker = add_worker("w", **worker_kwargs)
    run_pass(session, settings)
    assert (placed_on(session, job) == worker.id) is placed


def test_busy_paused_and_silent_workers_get_nothing(session, settings, add_worker, queue) -> None:  # type: ignore[no-untyped-def]
    job = queue()
    for name, state, until in [("busy", WorkerState.working, 30), ("paused", WorkerState.paused, 30),
                               ("gone", WorkerState.idle, -1)]:
        worker = add_worker(name)
        worker.state, worker.available_until = state, utcnow() + timedelta(seconds=until)
    session.commit()
    assert run_pass(session, settings) == 0 and placed_on(session, job) is None


def test_each_worker_gets_one_job_and_the_oldest_jobs_go_first(session, settings, add_worker, queue) -> None:  # type: ignore[no-untyped-def]
    jobs = [queue() for _ in range(3)]
    add_worker("a")
    add_worker("b")
    assert run_pass(session, settings) == 2
    statuses = [session.get(JobModel, j).status for j in jobs]  # type: ignore[union-attr]
    assert statuses == [JobStatus.running, JobStatus.running, JobStatus.queued]


def test_resumes_from_the_latest_checkpoint(session, settings, add_worker, queue) -> None:  # type: ignore[no-untyped-def]
    from coordinator.db.tables import JobCheckpointModel  # noqa: PLC0415

    job = queue()
    for step, digest in ((10, "a" * 64), (30, "b" * 64), (20, "c" * 64), (40, None)):  # 40: never uploaded
        session.add(JobCheckpointModel(id=f"ftckpt-{step}", job_id=job, step_number=step, metrics={},
                                       fine_tuned_model_checkpoint=f"x:{step}", blob_sha256=digest))
    session.commit()
    add_worker("w")
    run_pass(session, settings)
    lease = session.scalars(select(LeaseModel).where(LeaseModel.job_id == job)).one()
    assert lease.resume_checkpoint_id == "ftckpt-30"

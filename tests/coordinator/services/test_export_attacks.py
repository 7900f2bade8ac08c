"""Exports on a real database (both backends), through the services as the API's handlers call them and over HTTP
where the customer reads: a hostile provider replaying tokens, uploading for a lease it does not hold and leaving
its uploads behind, and a customer whose export runs out of balance mid-lease.

Each test asserts the safe behaviour."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from coordinator.db.tables import (
    AccountModel,
    Book,
    FileModel,
    JobModel,
    JobStatus,
    LeaseModel,
    LeaseStatus,
    UsageRecordModel,
    utcnow,
)
from coordinator.services import blobs, budgets, exports, ledger
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from shared.errors import InvalidRequest, LeaseLost, NotFound
from tests.conftest import Caller
from tests.coordinator.services.test_exports import KINDS, NewJob, request, succeeded
from tests.fakes import ServiceAgent, merged_archive

Agents = Callable[..., ServiceAgent]


def _export_lease(session: Session, store: BlobStore, settings: CoordinatorSettings, account: AccountModel,
                  agent: ServiceAgent, new_job: NewJob, formats: list[str]) -> tuple[JobModel, JobModel, str]:
    job = succeeded(session, agent, new_job)
    export = request(session, store, settings, account, job, formats=formats)
    a = agent.claim(kinds=KINDS)
    assert a is not None and a.job_id == export.id and a.kind == "export"
    agent.events(a.lease_id, {"type": "started", "total_steps": len(formats), "message": "Export started on cpu"})
    return job, export, a.lease_id


def _drain(session: Session, account: AccountModel) -> None:
    available = ledger.balance(session, Book.customer_available, account.id)
    ledger.move(session=session, key=f"drain-{account.id}", kind="grant", amount=available,
                frm=(Book.customer_available, account.id), to=(Book.platform_grants, ""), description="drain",
                account_id=account.id)
    session.commit()


def test_an_export_whose_hold_runs_out_mid_lease_still_reads_and_is_not_left_paused(
    client: TestClient, session: Session, store: BlobStore, settings: CoordinatorSettings, customer: Caller,
    customer_account: AccountModel, service_agent: Agents, new_job: NewJob,
) -> None:
    """An export holds its estimate (at least `min_hold_usd`, $0.01: about 2 minutes at $0.33/GPU-hour); a lease
    that runs past it (a slow uplink, a large model) on a customer with nothing left makes the budgets sweep
    `pause_for_balance` it (budgets.py `_review`, written for fine-tuning jobs). `paused` is not an export status
    (shared/schemas/exports.py ExportStatus), so every GET of the export - and the list of the job's exports -
    answers 500 from then on, and no route resumes it."""
    job, export, lease_id = _export_lease(session, store, settings, customer_account, service_agent(), new_job,
                                          ["merged"])
    _drain(session, customer_account)
    an_hour_ago = utcnow() - timedelta(hours=1)
    session.execute(update(JobModel).where(JobModel.id == export.id).values(accruing_since=an_hour_ago))
    session.execute(update(LeaseModel).where(LeaseModel.id == lease_id).values(training_started_at=an_hour_ago))
    session.commit()
    budgets.enforce_budgets(session=session, settings=settings)
    session.expire_all()
    after = session.get(JobModel, export.id)
    assert after is not None and after.held_micros == 0

    base = f"/v1/fine_tuning/jobs/{job.id}/exports"
    read = client.get(f"{base}/{export.id}", headers=customer.headers)
    assert read.status_code == 200, (after.status, read.status_code, read.text[:200])
    assert client.get(base, headers=customer.headers).status_code == 200
    assert read.json()["status"] in ("failed", "cancelled")  # an export has no resume: it ends, and says why


def _aged(path: os.PathLike[str], seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.mark.parametrize("ending", ["worker_fails", "customer_cancels"])
def test_the_uploads_of_an_export_lease_that_ended_without_completing_are_collected(
    ending: str, session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Agents, new_job: NewJob,
) -> None:
    """Uploads are stored under exports/<lease>/ and deleted only by a completion; the periodic blob sweep
    (blobs.py `_remove_orphans`) looks at files/, checkpoints/ and adapters/ only. A provider that uploads a
    merged model (2 x parameters bytes: 16 GB for an 8B model) and then fails the lease - or whose export the
    customer cancels, or whose lease is lost - leaves it on the coordinator's disk for good, once per attempt,
    half-written `.incoming-` uploads included."""
    agent = service_agent()
    job, export, lease_id = _export_lease(session, store, settings, customer_account, agent, new_job, ["merged"])
    agent.upload_export(lease_id, "merged", merged_archive())
    abandoned = store.path(f"exports/{lease_id}/.incoming-abandoned")
    abandoned.write_bytes(b"y" * 5000)  # an upload cut off half way
    if ending == "worker_fails":
        agent.fail(lease_id, message="disk full")
    else:
        exports.cancel(session=session, account=customer_account, job_id=job.id, export_id=export.id)
    session.expire_all()
    lease = session.get(LeaseModel, lease_id)
    assert lease is not None and lease.status in (LeaseStatus.failed, LeaseStatus.cancelled)
    left = [p for p in store.path(f"exports/{lease_id}").iterdir() if p.is_file()]
    assert len(left) == 2
    for path in store.root.rglob("*"):
        if path.is_file():
            _aged(path, blobs.ORPHAN_GRACE_S + 60)
    blobs.collect(session=session, store=store, settings=settings)
    still = [p.name for p in store.path(f"exports/{lease_id}").iterdir() if p.is_file()]
    assert still == [], f"{len(still)} uploads of ended lease {lease_id} are never collected"


def test_a_provider_cannot_upload_or_complete_for_a_lease_it_does_not_hold_nor_replay_an_old_token(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Agents, new_job: NewJob, new_provider: Callable[[str], AccountModel],
) -> None:
    """(Guard.) Another provider's worker gets a 404 on the lease's upload and cannot complete it; after the lease
    ends (preempted), its old token is refused on upload and completion; the next lease's completion needs its own
    uploads; completing twice bills once and makes the files once; an upload after completion is refused."""
    honest = service_agent()
    _, export, lease_id = _export_lease(session, store, settings, customer_account, honest, new_job, ["merged"])
    intruder = service_agent("mallory-pc", provider=new_provider("mallory"))
    intruder.leases[lease_id] = honest.leases[lease_id]  # the token, replayed by a worker that does not hold it
    with pytest.raises(NotFound):
        intruder.upload_export(lease_id, "merged", merged_archive())
    with pytest.raises((NotFound, InvalidRequest)):
        intruder.complete_export(lease_id)
    assert not list(store.root.glob(f"exports/{lease_id}/*"))

    honest.upload_export(lease_id, "merged", merged_archive())
    honest.preempted(lease_id)
    with pytest.raises(LeaseLost):
        honest.upload_export(lease_id, "merged", merged_archive())
    with pytest.raises(LeaseLost):
        honest.complete_export(lease_id)

    b = intruder.claim(kinds=KINDS)
    assert b is not None and b.job_id == export.id and b.lease_id != lease_id
    intruder.events(b.lease_id, {"type": "started", "total_steps": 1})
    with pytest.raises(Exception) as early:  # the first lease's upload is not this one's
        intruder.complete_export(b.lease_id)
    assert getattr(early.value, "code", None) == "export_missing"
    intruder.upload_export(b.lease_id, "merged", merged_archive())
    intruder.complete_export(b.lease_id)
    intruder.complete_export(b.lease_id)  # a retried report answers like the first
    with pytest.raises(LeaseLost):
        intruder.upload_export(b.lease_id, "merged", merged_archive())
    session.expire_all()
    done = session.get(JobModel, export.id)
    assert done is not None and done.status is JobStatus.succeeded and len(done.result_files) == 1
    assert session.query(UsageRecordModel).filter_by(lease_id=b.lease_id).count() == 1
    assert session.query(FileModel).filter(FileModel.id.in_(done.result_files)).count() == 1

"""`lease_states`: the reaper (leases gone quiet are suspect after the ttl, lost after the grace; the job resumes
on another worker from its last checkpoint with a higher fencing token, and the first worker's late reports get
409), assignments never picked up, and the one "end this lease and requeue or fail its job" path."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from coordinator.db.tables import LeaseModel, LeaseStatus, WorkerModel, utcnow
from coordinator.services.lease_states import reap
from coordinator.settings import CoordinatorSettings
from tests.fakes import FakeAgent, adapter_archive, sha256


@pytest.fixture
def provider(make_caller):  # type: ignore[no-untyped-def]
    return make_caller("provider", "pat")


def silence(session: Session, lease_id: str, seconds: float) -> None:
    """As if the lease's worker had not been heard from for `seconds` (instead of sleeping through it)."""
    session.execute(update(LeaseModel).where(LeaseModel.id == lease_id)
                    .values(last_renewed_at=utcnow() - timedelta(seconds=seconds)))
    session.commit()


def placed_by_dispatcher(session: Session, job_id: str, timeout_s: float = 5.0) -> LeaseModel:
    """The lease the app's dispatcher creates right after the job is queued (it runs after the response)."""
    deadline = time.monotonic() + timeout_s
    while True:
        session.expire_all()
        lease = session.scalars(select(LeaseModel).where(LeaseModel.job_id == job_id)).first()
        if lease is not None or time.monotonic() > deadline:
            assert lease is not None, "the job was not placed"
            return lease
        time.sleep(0.02)


def test_lost_lease_resumes_elsewhere_from_the_last_checkpoint(
    client: TestClient, session: Session, settings: CoordinatorSettings, provider, customer, create_job,  # type: ignore[no-untyped-def]
) -> None:
    first = FakeAgent.register(client, provider.key, machine_id="pc-1")
    job = create_job().json()
    a = first.claim(wait_s=2)
    assert a is not None and a["fencing_token"] == 1
    first.progress(a["lease_id"], step=5, loss=1.9)
    checkpoint = first.checkpoint_for(a["lease_id"], 5)
    assert first.upload(a["lease_id"], "checkpoint", checkpoint, step=5).status_code == 200

    silence(session, a["lease_id"], settings.lease_ttl_s + 1)
    assert reap(session=session, settings=settings) == {"suspect": 1, "lost": 0, "unclaimed": 0, "suspended": 0}
    assert reap(session=session, settings=settings)["suspect"] == 0  # said once
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=customer.headers).json()["status"] == "running"

    silence(session, a["lease_id"], settings.lease_grace_s + 1)
    assert reap(session=session, settings=settings)["lost"] == 1
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=customer.headers).json()["status"] == "queued"
    session.expire_all()
    assert session.get(WorkerModel, first.worker_id).lost_leases == 1  # type: ignore[union-attr]

    second = FakeAgent.register(client, provider.key, machine_id="pc-2")
    b = second.claim(wait_s=2)
    assert b is not None and b["job_id"] == job["id"] and b["fencing_token"] == 2
    assert b["resume_from"]["step"] == 5 and b["resume_from"]["sha256"] == sha256(checkpoint)
    resumed = client.get(b["resume_from"]["url"], headers=second.headers(b["lease_id"]))
    assert resumed.status_code == 200 and resumed.content == checkpoint

    late = first.complete(a["lease_id"], adapter_archive())
    assert late.status_code == 409 and late.json()["error"]["code"] == "lease_lost"
    # The reaper ran here outside the app, so no recheck flag reached the hot state (as if Redis had lost it):
    # the next batch flush finds the ended lease, and the heartbeat after it carries the command.
    assert first.heartbeat("working", lease_id=a["lease_id"]).json()["commands"] == []
    client.portal.call(client.app.state.heartbeats.flush_now)  # type: ignore[attr-defined, union-attr]
    beat = first.heartbeat("working", lease_id=a["lease_id"]).json()
    assert beat["commands"][0]["type"] == "lease_lost"
    # The first worker cannot read the job's inputs any more either: the URL died with its lease.
    assert client.get(a["training_file_url"], headers=first.headers(a["lease_id"])).status_code == 409

    assert second.finish(b["lease_id"]).json()["job_status"] == "succeeded"
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100", headers=customer.headers).json()["data"]
    messages = " | ".join(e["message"] for e in events)
    assert "has not reported" in messages and "resuming from checkpoint" in messages


def test_heartbeats_keep_a_lease_alive(client: TestClient, session: Session, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
                                       provider, create_job) -> None:
    agent = FakeAgent.register(client, provider.key)
    create_job()
    a = agent.claim(wait_s=2)
    assert a is not None
    silence(session, a["lease_id"], settings.lease_grace_s + 1)
    assert agent.heartbeat("working", lease_id=a["lease_id"], step=3).status_code == 200
    client.portal.call(client.app.state.heartbeats.flush_now)  # type: ignore[attr-defined, union-attr]
    session.expire_all()
    assert session.get(LeaseModel, a["lease_id"]).last_step == 3  # type: ignore[union-attr]
    assert reap(session=session, settings=settings) == {"suspect": 0, "lost": 0, "unclaimed": 0, "suspended": 0}


def test_an_assignment_never_picked_up_goes_back_without_using_an_attempt(
    client: TestClient, session: Session, settings: CoordinatorSettings, provider, customer, create_job,  # type: ignore[no-untyped-def]
) -> None:
    agent = FakeAgent.register(client, provider.key)
    assert agent.claim() is None  # idle and placeable from now on
    job = create_job().json()
    lease = placed_by_dispatcher(session, job["id"])
    lease.created_at = utcnow() - timedelta(seconds=settings.assignment_ttl_s + 1)
    lease.status = LeaseStatus.assigned
    session.commit()
    assert reap(session=session, settings=settings)["unclaimed"] == 1
    body = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=customer.headers).json()
    assert body["status"] == "queued"
    session.expire_all()
    assert session.get(WorkerModel, agent.worker_id).lost_leases == 0  # type: ignore[union-attr]


def test_the_job_fails_after_max_attempts_lost_workers(
    client: TestClient, session: Session, settings: CoordinatorSettings, provider, customer, create_job,  # type: ignore[no-untyped-def]
) -> None:
    job = create_job().json()
    for attempt in range(settings.max_attempts):
        agent = FakeAgent.register(client, provider.key, machine_id=f"pc-{attempt}")
        a = agent.claim(wait_s=2)
        assert a is not None
        silence(session, a["lease_id"], settings.lease_grace_s + 1)
        reap(session=session, settings=settings)
    body = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=customer.headers).json()
    assert body["status"] == "failed" and body["error"]["code"] == "worker_error"

"""Checkpoints at the door (coordinator/services/checkpoints.py): a refused upload is a 422 with its reason, is
not stored, is not billed and counts against its worker (repeat offenders are suspended and lose the lease);
no step past what the lease reported; and when a later worker says the checkpoint it was handed is bad, the
coordinator's own check decides who is at fault."""

from __future__ import annotations

import pickle

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from coordinator.db.tables import JobCheckpointModel, LeaseModel, UsageRecordModel, WorkerModel, utcnow
from coordinator.services.lease_states import reap
from coordinator.settings import CoordinatorSettings
from tests.coordinator.services.test_lease_states import silence
from tests.fakes import FakeAgent


@pytest.fixture
def provider(make_caller):  # type: ignore[no-untyped-def]
    return make_caller("provider", "pat")


class _Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("pwned",))


def _start(client: TestClient, provider, create_job, machine: str = "pc-1") -> tuple[FakeAgent, dict, dict]:  # type: ignore[no-untyped-def, type-arg]
    agent = FakeAgent.register(client, provider.key, machine_id=machine)
    job = create_job().json()
    assignment = agent.claim(wait_s=2)
    assert assignment is not None and assignment["job_id"] == job["id"]
    return agent, job, assignment


def _stored(settings: CoordinatorSettings) -> list[str]:
    folder = settings.resolved_storage_dir / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


def _worker(session: Session, worker_id: str) -> WorkerModel:
    session.expire_all()
    worker = session.get(WorkerModel, worker_id)
    assert worker is not None
    return worker


def test_a_checkpoint_holding_a_pickle_is_refused_not_stored_and_counted(
    client: TestClient, session: Session, settings: CoordinatorSettings, provider, customer, create_job,  # type: ignore[no-untyped-def]
) -> None:
    agent, job, a = _start(client, provider, create_job)
    assert agent.progress(a["lease_id"], step=3).status_code == 200
    archive = agent.checkpoint_for(a["lease_id"], 3, **{"state.json": pickle.dumps(_Payload())})
    refused = agent.upload(a["lease_id"], "checkpoint", archive, step=3)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "checkpoint_rejected", refused.text
    assert "state.json" in refused.json()["error"]["message"]
    assert _stored(settings) == []
    listed = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=customer.headers).json()["data"]
    assert listed == []
    assert _worker(session, agent.worker_id).failed_checks == 1
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=50", headers=customer.headers).json()["data"]
    assert any("failed its checks" in e["message"] for e in events)
    assert agent.save_checkpoint(a["lease_id"], 3).status_code == 200  # an honest one still goes in
    assert len(_stored(settings)) == 1


def test_no_checkpoint_step_past_what_the_lease_reported(
    client: TestClient, session: Session, provider, create_job,  # type: ignore[no-untyped-def]
) -> None:
    agent, _, a = _start(client, provider, create_job)
    assert agent.progress(a["lease_id"], step=2).status_code == 200
    ahead = agent.upload(a["lease_id"], "checkpoint", agent.checkpoint_for(a["lease_id"], 9), step=9)
    assert ahead.status_code == 422 and "past the 2 steps" in ahead.json()["error"]["message"]
    lying = agent.upload(a["lease_id"], "checkpoint", agent.checkpoint_for(a["lease_id"], 2), step=1)
    assert lying.status_code == 422 and "upload says step 1" in lying.json()["error"]["message"]


def test_progress_past_what_the_job_can_have_is_refused(client: TestClient, provider, create_job) -> None:  # type: ignore[no-untyped-def]
    agent, _, a = _start(client, provider, create_job)
    # 12 examples, 3 epochs, batches of at least one: at most 36 steps.
    claimed = agent.progress(a["lease_id"], step=10**9)
    assert claimed.status_code == 400 and claimed.json()["error"]["code"] == "implausible_step"
    assert agent.progress(a["lease_id"], step=36).status_code == 200


def test_repeated_bad_uploads_suspend_the_worker_and_release_its_job(
    client: TestClient, session: Session, settings: CoordinatorSettings, provider, customer, create_job,  # type: ignore[no-untyped-def]
) -> None:
    agent, job, a = _start(client, provider, create_job)
    assert agent.progress(a["lease_id"], step=1).status_code == 200
    for _ in range(settings.suspend_after_failed_checks):
        assert agent.upload(a["lease_id"], "checkpoint", b"random junk" * 100, step=1).status_code == 422
    worker = _worker(session, agent.worker_id)
    assert worker.suspended_at is not None and worker.failed_checks == settings.suspend_after_failed_checks
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=customer.headers).json()["status"] == "queued"
    lease = session.get(LeaseModel, a["lease_id"])
    assert lease is not None and lease.status.value == "lost"
    usage = session.scalars(select(UsageRecordModel).where(UsageRecordModel.lease_id == a["lease_id"])).first()
    assert usage is None or usage.charge_micros == 0  # junk is never billed


def _lose(session: Session, settings: CoordinatorSettings, lease_id: str) -> None:
    silence(session, lease_id, settings.lease_grace_s + 1)
    assert reap(session=session, settings=settings)["lost"] == 1


def test_a_bad_checkpoint_the_coordinator_confirms_blames_its_uploader_and_resumes_from_the_one_before(
    client: TestClient, session: Session, settings: CoordinatorSettings, provider, customer, create_job,  # type: ignore[no-untyped-def]
) -> None:
    uploader, job, a = _start(client, provider, create_job)
    assert uploader.save_checkpoint(a["lease_id"], 2).status_code == 200
    assert uploader.save_checkpoint(a["lease_id"], 4).status_code == 200
    newest = session.scalars(select(JobCheckpointModel).where(JobCheckpointModel.step_number == 4)).one()
    # The stored bytes went bad after the check (a rule the upload predates, a corrupted disk): the
    # coordinator's recheck of what it would hand out disagrees with what was recorded.
    path = settings.resolved_storage_dir / "checkpoints" / newest.id
    path.write_bytes(path.read_bytes()[:-100])
    _lose(session, settings, a["lease_id"])

    opener = FakeAgent.register(client, provider.key, machine_id="pc-2")
    b = opener.claim(wait_s=2)
    assert b is not None and b["resume_from"]["checkpoint_id"] == newest.id
    reported = client.post(f"/v1/workers/leases/{b['lease_id']}/fail", headers=opener.headers(b["lease_id"]), json={
        "kind": "bad_checkpoint", "message": "resume/: archive truncated", "usage": {"wall_seconds": 3, "gpu_seconds": 3}})
    assert reported.status_code == 200 and reported.json()["job_status"] == "queued", reported.text
    session.expire_all()
    quarantined = session.get(JobCheckpointModel, newest.id)
    assert quarantined is not None and quarantined.quarantined_at is not None
    assert _worker(session, uploader.worker_id).failed_checks == 1
    blameless = _worker(session, opener.worker_id)
    assert (blameless.failed_checks, blameless.lost_leases) == (0, 0)
    usage = session.scalars(select(UsageRecordModel).where(UsageRecordModel.lease_id == b["lease_id"])).first()
    assert usage is None or usage.charge_micros == 0

    third = FakeAgent.register(client, provider.key, machine_id="pc-3")
    c = third.claim(wait_s=2)
    assert c is not None and c["resume_from"]["step"] == 2  # the one before
    listed = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=customer.headers).json()["data"]
    assert {ck["step_number"] for ck in listed} == {2, 4}  # still listed, never resumed from


def test_a_bad_checkpoint_claim_the_coordinator_cannot_confirm_blames_nobody_and_pays_nothing(
    client: TestClient, session: Session, settings: CoordinatorSettings, provider, create_job,  # type: ignore[no-untyped-def]
) -> None:
    """The trainer checks what the coordinator cannot (the exact step count, torch's view of the RNG states):
    a checkpoint that passes here may still be refused there. Blaming either side would let a worker frame the
    other, so neither is blamed, the reporter earns nothing, and the checkpoint is set aside."""
    uploader, job, a = _start(client, provider, create_job)
    assert uploader.save_checkpoint(a["lease_id"], 2).status_code == 200
    assert uploader.save_checkpoint(a["lease_id"], 3).status_code == 200
    _lose(session, settings, a["lease_id"])
    claimant = FakeAgent.register(client, provider.key, machine_id="pc-2")
    b = claimant.claim(wait_s=2)
    assert b is not None and b["resume_from"]["step"] == 3
    assert claimant.progress(b["lease_id"], step=3).status_code == 200  # it even "trained" before claiming
    reported = client.post(f"/v1/workers/leases/{b['lease_id']}/fail", headers=claimant.headers(b["lease_id"]), json={
        "kind": "bad_checkpoint", "message": "it is bad, trust me", "usage": {"wall_seconds": 600, "gpu_seconds": 600}})
    assert reported.status_code == 200 and reported.json()["job_status"] == "queued"
    assert _worker(session, claimant.worker_id).failed_checks == 0
    assert _worker(session, uploader.worker_id).failed_checks == 0
    usage = session.scalars(select(UsageRecordModel).where(UsageRecordModel.lease_id == b["lease_id"])).first()
    assert usage is None or usage.charge_micros == 0  # nothing billed for the claim
    c = FakeAgent.register(client, provider.key, machine_id="pc-3").claim(wait_s=2)
    assert c is not None and c["resume_from"]["step"] == 2  # the one before


def test_a_claim_about_a_checkpoint_never_handed_is_false_and_counted(
    client: TestClient, session: Session, provider, create_job,  # type: ignore[no-untyped-def]
) -> None:
    agent, _, a = _start(client, provider, create_job)
    reported = client.post(f"/v1/workers/leases/{a['lease_id']}/fail", headers=agent.headers(a["lease_id"]), json={
        "kind": "bad_checkpoint", "message": "bad", "usage": {"wall_seconds": 1, "gpu_seconds": 1}})
    assert reported.status_code == 200
    assert _worker(session, agent.worker_id).failed_checks == 1


def test_checkpoints_stored_before_the_checks_are_never_handed_out(
    client: TestClient, session: Session, settings: CoordinatorSettings, provider, create_job,  # type: ignore[no-untyped-def]
) -> None:
    uploader, _, a = _start(client, provider, create_job)
    assert uploader.save_checkpoint(a["lease_id"], 3).status_code == 200
    session.execute(update(JobCheckpointModel).values(quarantined_at=utcnow(), quarantine_reason="stored before checks")
                    .where(JobCheckpointModel.lease_id == a["lease_id"]))  # what migration 0004 does to old rows
    session.commit()
    _lose(session, settings, a["lease_id"])
    b = FakeAgent.register(client, provider.key, machine_id="pc-2").claim(wait_s=2)
    assert b is not None and b["resume_from"] is None

"""`/v1/workers/leases/{lease_id}` over HTTP: what the API layer adds to the lease services (tested themselves
in tests/coordinator/services/test_leases.py): the fencing-token header, sha256 headers and upload bounds,
status codes and error envelopes, the input URLs dying with the lease, and commands reaching the agent on its
heartbeat. On SQLite and PostgreSQL, with `tests.fakes.FakeAgent` speaking real HTTP."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from coordinator.db.tables import LeaseModel, LeaseStatus
from tests.coordinator.api.conftest import placed
from tests.fakes import FakeAgent, adapter_archive, sha256


def test_assignment_carries_spec_inputs_and_price(client: TestClient, agent: FakeAgent, create_job) -> None:  # type: ignore[no-untyped-def]
    job, a = placed(client, agent, create_job, suffix="demo", seed=7)
    assert a["fencing_token"] == 1 and a["resume_from"] is None and a["ask_price_per_gpu_hour"] == "0.300000"
    assert a["spec"]["job_id"] == job["id"] and a["spec"]["seed"] == 7 and a["spec"]["lora"]["alpha"] == 32
    assert a["spec"]["model_dir"] == "models/tunegrid/tiny-llama" and a["base_model_repo"] is None
    data = client.get(a["training_file_url"], headers=agent.headers(a["lease_id"]))
    assert data.status_code == 200 and sha256(data.content) == a["training_file_sha256"]
    assert a["validation_file_url"] is None
    assert client.get(a["training_file_url"], headers=agent.headers()).status_code == 400  # no fencing token


def test_dataset_url_is_only_for_the_lease_holder(client: TestClient, provider, agent: FakeAgent, create_job) -> None:  # type: ignore[no-untyped-def]
    _, a = placed(client, agent, create_job)
    stranger = FakeAgent.register(client, provider.key, machine_id="pc-2")
    response = client.get(a["training_file_url"], headers={**stranger.headers(), "Tunegrid-Fencing-Token": "1"})
    assert response.status_code == 404


def test_checkpoint_upload_is_checked_and_listed(client: TestClient, customer, agent: FakeAgent, create_job,  # type: ignore[no-untyped-def]
                                                 session: Session, settings) -> None:
    job, a = placed(client, agent, create_job)
    agent.progress(a["lease_id"], step=5, loss=1.5)
    blob = agent.checkpoint_for(a["lease_id"], 5)
    bad = agent.upload(a["lease_id"], "checkpoint", blob, step=5, digest="0" * 64)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "sha256_mismatch"
    assert list((settings.resolved_storage_dir / "checkpoints").glob("*")) == []  # nothing half-stored
    good = agent.upload(a["lease_id"], "checkpoint", blob, step=5)
    assert good.status_code == 200 and good.json()["bytes"] == len(blob)
    listed = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=customer.headers).json()["data"]
    assert [c["step_number"] for c in listed] == [5] and listed[0]["metrics"]["train_loss"] == 1.5


def test_upload_without_sha256_header_is_refused(client: TestClient, agent: FakeAgent, create_job) -> None:  # type: ignore[no-untyped-def]
    _, a = placed(client, agent, create_job)
    response = client.put(f"/v1/workers/leases/{a['lease_id']}/adapter", content=b"x", headers=agent.headers(a["lease_id"]))
    assert response.status_code == 400 and response.json()["error"]["code"] == "missing_sha256"


def test_stale_fencing_token_gets_lease_lost(agent: FakeAgent, client: TestClient, create_job) -> None:  # type: ignore[no-untyped-def]
    _, a = placed(client, agent, create_job)
    response = agent.events(a["lease_id"], {"type": "log", "message": "hi"}, token=a["fencing_token"] + 1)
    assert response.status_code == 409 and response.json()["error"]["code"] == "lease_lost"


def test_cancel_reaches_the_worker_as_a_heartbeat_command(client: TestClient, customer, agent: FakeAgent,  # type: ignore[no-untyped-def]
                                                          create_job) -> None:
    job, a = placed(client, agent, create_job)
    agent.heartbeat("working", lease_id=a["lease_id"], step=1)  # within the db interval: the next one would be cached
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=customer.headers).status_code == 200
    reply = agent.heartbeat("working", lease_id=a["lease_id"], step=2).json()
    assert reply["commands"] == [{"type": "cancel", "lease_id": a["lease_id"], "reason": "the customer cancelled the job"}]
    late = agent.events(a["lease_id"], {"type": "log", "message": "still going"})
    assert late.status_code == 409 and late.json()["error"]["code"] == "lease_lost"


def test_a_worker_that_ended_its_own_lease_is_not_sent_to_the_database_by_its_next_heartbeat(  # type: ignore[no-untyped-def]
        client: TestClient, customer, agent: FakeAgent, create_job, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its complete (fail, preempted) call's reply told it the outcome: no recheck for it, so the fleet's
    heartbeats stay off the database as jobs end. A lease ended by anyone else still sends it there."""
    from coordinator.services import workers  # noqa: PLC0415

    reads: list[str] = []
    recorded = workers.record_heartbeat
    monkeypatch.setattr(workers, "record_heartbeat", lambda **kw: reads.append(kw["worker"].id) or recorded(**kw))
    job, a = placed(client, agent, create_job)
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=customer.headers).status_code == 200
    assert agent.heartbeat("working", lease_id=a["lease_id"], step=1).json()["commands"][0]["type"] == "cancel"
    assert reads == [agent.worker_id]
    _, b = placed(client, agent, create_job)
    adapter = adapter_archive("tunegrid/tiny-llama")
    assert agent.upload(b["lease_id"], "adapter", adapter).status_code == 200
    assert agent.complete(b["lease_id"], adapter).status_code == 200
    assert agent.heartbeat().status_code == 200 and reads == [agent.worker_id]  # no second read


def test_pause_reaches_the_worker_and_resume_requeues(client: TestClient, customer, agent: FakeAgent, create_job) -> None:  # type: ignore[no-untyped-def]
    job, a = placed(client, agent, create_job)
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause", headers=customer.headers).status_code == 200
    reply = agent.heartbeat("working", lease_id=a["lease_id"]).json()
    assert reply["commands"][0]["type"] == "pause"
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume", headers=customer.headers).json()["status"] == "queued"
    again = agent.claim(wait_s=2)
    assert again is not None and again["fencing_token"] == 2


def test_a_lease_of_another_worker_is_not_found(client: TestClient, provider, agent: FakeAgent, create_job) -> None:  # type: ignore[no-untyped-def]
    _, a = placed(client, agent, create_job)
    other = FakeAgent.register(client, provider.key, machine_id="pc-9")
    other.leases[a["lease_id"]] = a["fencing_token"]
    assert other.events(a["lease_id"], {"type": "log", "message": "x"}).status_code == 404
    assert other.complete(a["lease_id"], adapter_archive()).status_code == 404


@pytest.mark.parametrize("event", [{"type": "progress", "step": 2**40}, {"type": "progress", "step": 1, "trained_tokens": 2**70},
                                   {"type": "progress", "total_steps": -1}])
def test_out_of_range_counts_are_400_not_500(agent: FakeAgent, client: TestClient, create_job, event) -> None:  # type: ignore[no-untyped-def]
    _, a = placed(client, agent, create_job)
    response = agent.events(a["lease_id"], event)
    assert response.status_code == 400, response.text
    assert agent.heartbeat("working", lease_id=a["lease_id"], step=2**40).status_code == 400


@pytest.mark.parametrize("header", ["Tunegrid-Fencing-Token", "Tunegrid-Protocol"])
def test_non_ascii_digits_in_headers_are_400(agent: FakeAgent, client: TestClient, create_job, header: str) -> None:  # type: ignore[no-untyped-def]
    _, a = placed(client, agent, create_job)
    headers = {**agent.headers(a["lease_id"]), header: "\u00b2".encode("latin-1")}
    response = client.post(f"/v1/workers/leases/{a['lease_id']}/events", json={"events": [{"type": "log", "message": "x"}]},
                           headers=headers)  # type: ignore[arg-type]
    assert response.status_code == 400, response.text


def test_a_second_adapter_upload_replaces_the_first(agent: FakeAgent, client: TestClient, create_job, settings) -> None:  # type: ignore[no-untyped-def]
    _, a = placed(client, agent, create_job)
    agent.progress(a["lease_id"])
    assert agent.upload(a["lease_id"], "adapter", b"a first try").status_code == 200
    adapter = adapter_archive()
    assert agent.upload(a["lease_id"], "adapter", adapter).status_code == 200
    stale = agent.complete(a["lease_id"], b"a first try")
    assert stale.status_code == 400 and stale.json()["error"]["code"] == "sha256_mismatch"
    assert agent.complete(a["lease_id"], adapter).json()["job_status"] == "succeeded"
    leftovers = list((settings.resolved_storage_dir / "adapters").rglob("*"))
    assert [p for p in leftovers if p.is_file()] == []  # both upload names are gone; the result file remains


def test_only_the_newest_checkpoints_keep_their_content(agent: FakeAgent, client: TestClient, customer, create_job,  # type: ignore[no-untyped-def]
                                                        settings, session: Session) -> None:
    job, a = placed(client, agent, create_job)
    keep = settings.max_checkpoints_per_job
    for step in range(1, keep + 3):
        assert agent.save_checkpoint(a["lease_id"], step).status_code == 200
    listed = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints?limit=50", headers=customer.headers).json()["data"]
    assert len(listed) == keep + 2  # every checkpoint stays listed
    stored = [p for p in (settings.resolved_storage_dir / "checkpoints").iterdir() if not p.name.startswith(".")]
    assert len(stored) == keep


def test_the_database_allows_one_live_lease_per_job(client: TestClient, agent: FakeAgent, create_job, session: Session) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy.exc import IntegrityError  # noqa: PLC0415

    _, a = placed(client, agent, create_job)
    lease = session.get(LeaseModel, a["lease_id"])
    assert lease is not None
    session.add(LeaseModel(id="lease-dup", job_id=lease.job_id, worker_id=lease.worker_id, fencing_token=99,
                           status=LeaseStatus.assigned, gpu_class="rtx-4090", ask_price_per_gpu_hour=1, price_per_gpu_hour=1))
    with pytest.raises(IntegrityError):
        session.commit()
    session.rollback()


def test_an_adapter_upload_is_bounded_by_what_the_jobs_adapter_can_be(client: TestClient, agent: FakeAgent,
                                                                       create_job, settings) -> None:  # type: ignore[no-untyped-def]
    import os  # noqa: PLC0415

    from coordinator.services.adapters import adapter_limit  # noqa: PLC0415
    from shared.catalog import get_base_model  # noqa: PLC0415

    _, a = placed(client, agent, create_job)
    limit = adapter_limit(get_base_model("tunegrid/tiny-llama"), {"r": 16, "target_modules": "all-linear"})
    assert limit < 4 * 1024 * 1024  # a tiny model's adapter is small: a bigger upload is refused while it streams
    huge = agent.upload(a["lease_id"], "adapter", os.urandom(limit + 2 * 1024 * 1024))
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "payload_too_large"
    assert [p for p in (settings.resolved_storage_dir / "adapters").rglob("*") if p.is_file()] == []
    assert agent.upload(a["lease_id"], "adapter", adapter_archive()).status_code == 200


@pytest.mark.parametrize("bad", ["fencing", "json", "sha256", "protocol"])
def test_a_bad_worker_token_is_told_so_before_anything_else_is_wrong(client: TestClient, agent: FakeAgent,
                                                                       create_job, bad: str) -> None:  # type: ignore[no-untyped-def]
    _, a = placed(client, agent, create_job)
    stranger = {**agent.headers(a["lease_id"]), "Authorization": "Bearer tgw_000000000000_nope"}
    if bad == "fencing":
        del stranger["Tunegrid-Fencing-Token"]
        response = client.post(f"/v1/workers/leases/{a['lease_id']}/events", json={"events": []}, headers=stranger)
    elif bad == "json":
        response = client.post(f"/v1/workers/leases/{a['lease_id']}/events", content=b"[",
                               headers={**stranger, "Content-Type": "application/json"})
    elif bad == "sha256":
        response = client.put(f"/v1/workers/leases/{a['lease_id']}/adapter", content=b"x", headers=stranger)
    else:
        response = client.post(f"/v1/workers/leases/{a['lease_id']}/events", json={"events": []},
                               headers={**stranger, "Tunegrid-Protocol": "999"})
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "invalid_worker_token"


def test_on_the_disk_a_ticket_names_no_url_and_no_upload_key_is_adopted(client: TestClient, agent: FakeAgent,  # type: ignore[no-untyped-def]
                                                                         create_job) -> None:
    _, a = placed(client, agent, create_job)
    lease_id, data = a["lease_id"], b"adapter bytes"
    answer = client.post(f"/v1/workers/leases/{lease_id}/uploads", headers=agent.headers(lease_id),
                         json={"kind": "adapter", "bytes": len(data), "sha256": sha256(data)})
    assert answer.status_code == 200 and answer.json()["url"] is None  # the bytes go to the upload call itself
    staged = client.put(f"/v1/workers/leases/{lease_id}/adapter", headers={
        **agent.headers(lease_id), "Tunegrid-Sha256": sha256(data), "Tunegrid-Upload-Key": f"incoming/{lease_id}/adapter-up-1"})
    assert staged.status_code == 400 and staged.json()["error"]["code"] == "invalid_upload_key"

"""The worker protocol over HTTP: registration, authentication, heartbeats, claims, lease reports,
uploads and completion, on SQLite and PostgreSQL. The agent is `tests.fakes.FakeAgent`: real HTTP,
no training (its adapter is zeros of the right shapes)."""

from __future__ import annotations

import json

import anyio
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.tables import JobCheckpointModel, LeaseModel, LeaseStatus, WorkerModel
from shared.protocol import PROTOCOL_HEADER
from tests.fakes import FakeAgent, adapter_archive, gpu, registration, sha256


@pytest.fixture
def provider(make_caller):  # type: ignore[no-untyped-def]
    return make_caller("provider", "pat")


@pytest.fixture
def agent(client: TestClient, provider) -> FakeAgent:  # type: ignore[no-untyped-def]
    return FakeAgent.register(client, provider.key)


def job_of(client: TestClient, customer, job_id: str) -> dict:  # type: ignore[no-untyped-def, type-arg]
    return client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=customer.headers).json()


def placed(client: TestClient, agent: FakeAgent, create_job, **fields) -> tuple[dict, dict]:  # type: ignore[no-untyped-def, type-arg]
    job = create_job(**fields).json()
    assignment = agent.claim(wait_s=2)
    assert assignment is not None and assignment["job_id"] == job["id"]
    return job, assignment


# --- registration and authentication --------------------------------------------------------------

def test_register_returns_a_token_stored_only_as_a_hash(agent: FakeAgent, session: Session) -> None:
    worker = session.get(WorkerModel, agent.worker_id)
    assert worker is not None and agent.token.startswith("tgw_")
    assert agent.token.split("_", 2)[2] not in (worker.token_sha256, worker.token_prefix)
    assert worker.gpu_class == "rtx-4090" and worker.ask_price_per_gpu_hour == 300_000


def test_reregistering_a_machine_keeps_the_worker_and_replaces_the_token(client: TestClient, provider, agent: FakeAgent) -> None:  # type: ignore[no-untyped-def]
    again = FakeAgent.register(client, provider.key, price="0.50")
    assert again.worker_id == agent.worker_id
    assert agent.heartbeat().status_code == 401
    assert again.heartbeat().status_code == 200


@pytest.mark.parametrize("role", ["customer", "admin-none"])
def test_only_provider_keys_register(client: TestClient, make_caller, role: str) -> None:  # type: ignore[no-untyped-def]
    headers = {PROTOCOL_HEADER: "1"}
    if role == "customer":
        headers["Authorization"] = f"Bearer {make_caller('customer', 'c').key}"
        expected = 403
    else:
        expected = 401
    response = client.post("/v1/workers/register", json=registration("pc"), headers=headers)
    assert response.status_code == expected, response.text


def test_register_without_protocol_header_is_told_to_upgrade(client: TestClient, provider) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/v1/workers/register", json=registration("pc"), headers=provider.headers)
    assert response.status_code == 400 and response.json()["error"]["code"] == "unsupported_protocol_version"


@pytest.mark.parametrize("token", ["tgw_000000000000_nope", "garbage", "tg_abcdefabcdef_x"])
def test_unknown_worker_tokens_get_401(client: TestClient, token: str) -> None:
    response = client.post("/v1/workers/heartbeat", json={"activity": "idle"},
                           headers={"Authorization": f"Bearer {token}", PROTOCOL_HEADER: "1"})
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"


def test_revoked_worker_gets_401(client: TestClient, provider, agent: FakeAgent) -> None:  # type: ignore[no-untyped-def]
    assert agent.heartbeat().status_code == 200
    revoked = client.post(f"/v1/workers/{agent.worker_id}/revoke", headers=provider.headers)
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    response = agent.heartbeat()
    assert response.status_code == 401 and response.json()["error"]["code"] == "worker_revoked"


def test_providers_see_only_their_own_workers(client: TestClient, make_caller, agent: FakeAgent) -> None:  # type: ignore[no-untyped-def]
    other = make_caller("provider", "olga")
    assert client.get("/v1/workers", headers=other.headers).json()["data"] == []
    assert client.get(f"/v1/workers/{agent.worker_id}", headers=other.headers).status_code == 404
    admin = make_caller("admin", "root")
    assert [w["id"] for w in client.get("/v1/workers", headers=admin.headers).json()["data"]] == [agent.worker_id]


# --- heartbeats and claims ------------------------------------------------------------------------

def flush_heartbeats(client: TestClient) -> int:
    """Write the buffered heartbeats now instead of at the next flush period."""
    return client.portal.call(client.app.state.heartbeats.flush_now)  # type: ignore[attr-defined, union-attr]


def test_heartbeats_are_buffered_then_written_in_a_batch(client: TestClient, provider, agent: FakeAgent,  # type: ignore[no-untyped-def]
                                                         session: Session, create_job) -> None:
    others = [FakeAgent.register(client, provider.key, machine_id=f"pc-{i}") for i in range(2, 4)]
    create_job()
    busy = others[0].claim(wait_s=2)
    assert busy is not None
    response = agent.heartbeat(gpus=[{"uuid": "GPU-0", "memory_free_bytes": 20 * 1024**3, "temperature_c": 61.0}])
    assert response.status_code == 200 and response.json() == {"commands": [], "heartbeat_interval_s": 10}
    assert session.get(WorkerModel, agent.worker_id).last_heartbeat_at is None  # type: ignore[union-attr]
    agent.heartbeat(gpus=[{"uuid": "GPU-0", "temperature_c": 64.0}])
    others[0].heartbeat("working", lease_id=busy["lease_id"], step=7)
    others[1].heartbeat("paused_by_owner", pause_reason="a game is running")
    assert flush_heartbeats(client) == 3  # the latest heartbeat per worker, once, in one batch
    session.expire_all()
    assert session.get(LeaseModel, busy["lease_id"]).last_step == 7  # type: ignore[union-attr]
    assert session.get(WorkerModel, others[1].worker_id).state.value == "paused"  # type: ignore[union-attr]
    session.expire_all()
    worker = session.get(WorkerModel, agent.worker_id)
    assert worker is not None and worker.last_heartbeat_at is not None
    assert worker.telemetry["gpus"][0]["temperature_c"] == 64.0
    snapshot = client.portal.call(client.app.state.hot.latest, [agent.worker_id])  # type: ignore[union-attr]
    assert b'"temperature_c":64.0' in snapshot[agent.worker_id].replace(b" ", b"")


@pytest.mark.parametrize(("activity", "state"), [("paused_by_owner", "paused"), ("unavailable", "offline"),
                                                 ("idle", "idle")])
def test_heartbeat_activity_sets_the_worker_state(client: TestClient, agent: FakeAgent, session: Session,
                                                  activity: str, state: str) -> None:
    agent.heartbeat("paused_by_owner", pause_reason="a game is running")
    flush_heartbeats(client)
    agent.heartbeat(activity)
    flush_heartbeats(client)
    session.expire_all()
    assert session.get(WorkerModel, agent.worker_id).state.value == state  # type: ignore[union-attr]


def test_claim_with_nothing_queued_returns_no_assignment(agent: FakeAgent) -> None:
    assert agent.claim() is None


def test_assignment_carries_spec_inputs_and_price(client: TestClient, agent: FakeAgent, create_job) -> None:  # type: ignore[no-untyped-def]
    job, a = placed(client, agent, create_job, suffix="demo", seed=7)
    assert a["fencing_token"] == 1 and a["resume_from"] is None and a["ask_price_per_gpu_hour"] == "0.300000"
    assert a["spec"]["job_id"] == job["id"] and a["spec"]["seed"] == 7 and a["spec"]["lora"]["alpha"] == 32
    assert a["spec"]["model_dir"] == "models/tunegrid/tiny-llama" and a["base_model_repo"] is None
    data = client.get(a["training_file_url"], headers=agent.headers(a["lease_id"]))
    assert data.status_code == 200 and sha256(data.content) == a["training_file_sha256"]
    assert a["validation_file_url"] is None
    assert client.get(a["training_file_url"], headers=agent.headers()).status_code == 400  # no fencing token


def test_claim_again_returns_the_same_assignment(client: TestClient, agent: FakeAgent, create_job) -> None:  # type: ignore[no-untyped-def]
    _, a = placed(client, agent, create_job)
    again = agent.claim()
    assert again is not None and again["lease_id"] == a["lease_id"] and again["fencing_token"] == a["fencing_token"]


def test_dataset_url_is_only_for_the_lease_holder(client: TestClient, provider, agent: FakeAgent, create_job) -> None:  # type: ignore[no-untyped-def]
    _, a = placed(client, agent, create_job)
    stranger = FakeAgent.register(client, provider.key, machine_id="pc-2")
    response = client.get(a["training_file_url"], headers={**stranger.headers(), "Tunegrid-Fencing-Token": "1"})
    assert response.status_code == 404


# --- lease reports --------------------------------------------------------------------------------

def test_events_become_job_metrics_events(client: TestClient, customer, agent: FakeAgent, create_job) -> None:  # type: ignore[no-untyped-def]
    job, a = placed(client, agent, create_job)
    response = agent.events(a["lease_id"], {"type": "started", "total_steps": 10},
                            {"type": "progress", "step": 3, "total_steps": 10, "train_loss": 2.5, "tokens_per_s": 180},
                            {"type": "eval", "step": 3, "eval_loss": 2.7})
    assert response.status_code == 200 and response.json()["status"] == "running"
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=50", headers=customer.headers).json()["data"]
    metrics = [e for e in events if e["type"] == "metrics"]
    assert {"step": 3, "total_steps": 10, "train_loss": 2.5, "tokens_per_s": 180.0}.items() <= metrics[-1]["data"].items()
    assert any(e["data"].get("valid_loss") == 2.7 for e in metrics)


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


def test_complete_makes_the_adapter_a_result_file(client: TestClient, customer, agent: FakeAgent, create_job,  # type: ignore[no-untyped-def]
                                                  session: Session) -> None:
    job, a = placed(client, agent, create_job, suffix="sums")
    adapter = adapter_archive()
    response = agent.finish(a["lease_id"])
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "completed" and response.json()["job_status"] == "succeeded"
    done = job_of(client, customer, job["id"])
    assert done["status"] == "succeeded" and done["fine_tuned_model"].startswith("ft:tunegrid/tiny-llama:")
    assert done["fine_tuned_model"].endswith(f":sums:{job['id']}")
    [file_id] = done["result_files"]
    meta = client.get(f"/v1/files/{file_id}", headers=customer.headers).json()
    assert meta["purpose"] == "fine-tune-results"
    content = client.get(f"/v1/files/{file_id}/content", headers=customer.headers)
    assert sha256(content.content) == sha256(adapter)
    models = [m["id"] for m in client.get("/v1/models", headers=customer.headers).json()["data"]]
    assert done["fine_tuned_model"] in models
    worker = session.get(WorkerModel, agent.worker_id)
    assert worker is not None and worker.completed_leases == 1 and worker.state.value == "idle"
    assert worker.reliability > 0.9


def test_complete_twice_answers_the_same(agent: FakeAgent, client: TestClient, create_job) -> None:  # type: ignore[no-untyped-def]
    _, a = placed(client, agent, create_job)
    first = agent.finish(a["lease_id"])
    second = agent.complete(a["lease_id"], adapter_archive())
    assert first.status_code == second.status_code == 200 and first.json() == second.json()


def test_complete_without_adapter_is_a_conflict(agent: FakeAgent, client: TestClient, create_job) -> None:  # type: ignore[no-untyped-def]
    _, a = placed(client, agent, create_job)
    response = agent.complete(a["lease_id"], adapter_archive())
    assert response.status_code == 409 and response.json()["error"]["code"] == "adapter_missing"


def test_a_tampered_adapter_fails_the_lease_and_requeues_the_job(client: TestClient, customer, agent: FakeAgent,  # type: ignore[no-untyped-def]
                                                                 create_job, session: Session) -> None:
    job, a = placed(client, agent, create_job)
    wrong_rank = adapter_archive(r=8, alpha=32)
    agent.progress(a["lease_id"])
    assert agent.upload(a["lease_id"], "adapter", wrong_rank).status_code == 200
    response = agent.complete(a["lease_id"], wrong_rank)
    assert response.status_code == 200 and response.json()["status"] == "failed"
    assert "r/alpha" in response.json()["message"]
    assert job_of(client, customer, job["id"])["status"] in ("queued", "running")
    worker = session.get(WorkerModel, agent.worker_id)
    assert worker is not None and worker.failed_checks == 1 and worker.reliability < 0.9


def test_finishing_without_any_progress_is_rejected(agent: FakeAgent, client: TestClient, create_job) -> None:  # type: ignore[no-untyped-def]
    _, a = placed(client, agent, create_job)
    adapter = adapter_archive()
    agent.upload(a["lease_id"], "adapter", adapter)
    response = agent.complete(a["lease_id"], adapter)
    assert response.json()["status"] == "failed" and "no training progress" in response.json()["message"]


def test_user_error_fails_the_job(agent: FakeAgent, client: TestClient, customer, create_job) -> None:  # type: ignore[no-untyped-def]
    job, a = placed(client, agent, create_job)
    response = agent.fail(a["lease_id"], kind="user_error", message="line 3: no assistant message")
    assert response.status_code == 200 and response.json()["job_status"] == "failed"
    error = job_of(client, customer, job["id"])["error"]
    assert error["code"] == "invalid_training_data" and "line 3" in error["message"]


def test_worker_errors_requeue_until_max_attempts(client: TestClient, provider, customer, create_job, session: Session,  # type: ignore[no-untyped-def]
                                                  settings) -> None:
    job = create_job().json()
    for attempt in range(1, settings.max_attempts + 1):
        agent = FakeAgent.register(client, provider.key, machine_id=f"pc-{attempt}")
        a = agent.claim(wait_s=2)
        assert a is not None and a["fencing_token"] == attempt
        assert agent.fail(a["lease_id"], message="CUDA error: an illegal memory access").status_code == 200
    done = job_of(client, customer, job["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "worker_error"


def test_preemption_requeues_without_using_an_attempt(client: TestClient, customer, agent: FakeAgent, create_job,  # type: ignore[no-untyped-def]
                                                      session: Session) -> None:
    job, a = placed(client, agent, create_job)
    response = agent.preempted(a["lease_id"])
    assert response.status_code == 200 and response.json()["status"] == "preempted"
    session.expire_all()
    worker = session.get(WorkerModel, agent.worker_id)
    assert worker is not None and worker.state.value == "paused" and worker.lost_leases == 0
    assert job_of(client, customer, job["id"])["status"] == "queued"


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


def test_too_big_a_job_is_not_placed_on_a_small_card(client: TestClient, provider, create_job) -> None:  # type: ignore[no-untyped-def]
    small = FakeAgent.register(client, provider.key, gpus=[gpu("NVIDIA GeForce RTX 3070", 8, "8.6")])
    create_job(model="llama-3.1-8b-instruct")
    assert small.claim() is None
    big = FakeAgent.register(client, provider.key, machine_id="pc-big", gpus=[gpu("NVIDIA GeForce RTX 4090", 24, "8.9")])
    assert big.claim(wait_s=2) is not None


def test_lease_rows_keep_prices_fixed_at_placement(client: TestClient, agent: FakeAgent, create_job, session: Session) -> None:  # type: ignore[no-untyped-def]
    _, a = placed(client, agent, create_job)
    lease = session.scalars(select(LeaseModel).where(LeaseModel.id == a["lease_id"])).one()
    assert lease.ask_price_per_gpu_hour == 300_000 and lease.price_per_gpu_hour == 360_000
    assert lease.status is LeaseStatus.running and lease.claimed_at is not None
    assert session.scalars(select(JobCheckpointModel)).all() == []


# --- hostile or broken input ----------------------------------------------------------------------

@pytest.mark.parametrize("event", [{"type": "progress", "step": 2**40}, {"type": "progress", "step": 1, "trained_tokens": 2**70},
                                   {"type": "progress", "total_steps": -1}])
def test_out_of_range_counts_are_400_not_500(agent: FakeAgent, client: TestClient, create_job, event) -> None:  # type: ignore[no-untyped-def]
    _, a = placed(client, agent, create_job)
    response = agent.events(a["lease_id"], event)
    assert response.status_code == 400, response.text
    assert agent.heartbeat("working", lease_id=a["lease_id"], step=2**40).status_code == 400


def test_one_bad_row_does_not_stop_a_batch_of_heartbeats(client: TestClient, provider, agent: FakeAgent, session: Session,  # type: ignore[no-untyped-def]
                                                         create_job) -> None:
    from coordinator.heartbeat_flush import HeartbeatBuffer  # noqa: PLC0415

    create_job()
    a = agent.claim(wait_s=2)
    assert a is not None
    agent.heartbeat("working", lease_id=a["lease_id"], step=4)
    buffer: HeartbeatBuffer = client.app.state.heartbeats  # type: ignore[attr-defined]
    good = dict(buffer._latest)
    poisoned = dict(good)
    heartbeat, seen = next(iter(good.values()))
    poisoned["wrk-does-not-matter"] = (heartbeat.model_copy(update={"lease_id": None}), seen)
    original = buffer._flush

    async def flaky(batch):  # type: ignore[no-untyped-def]
        if "wrk-does-not-matter" in batch:
            raise RuntimeError("as if this row broke the statement")
        return await original(batch)

    buffer._flush, buffer._latest = flaky, poisoned
    try:
        assert flush_heartbeats(client) == 1  # the good row was written one by one; the bad one dropped
    finally:
        buffer._flush = original
    session.expire_all()
    assert session.get(LeaseModel, a["lease_id"]).last_step == 4  # type: ignore[union-attr]
    assert len(buffer) == 0


@pytest.mark.parametrize("header", ["Tunegrid-Fencing-Token", "Tunegrid-Protocol"])
def test_non_ascii_digits_in_headers_are_400(agent: FakeAgent, client: TestClient, create_job, header: str) -> None:  # type: ignore[no-untyped-def]
    _, a = placed(client, agent, create_job)
    headers = {**agent.headers(a["lease_id"]), header: "\u00b2".encode("latin-1")}
    response = client.post(f"/v1/workers/leases/{a['lease_id']}/events", json={"events": [{"type": "log", "message": "x"}]},
                           headers=headers)  # type: ignore[arg-type]
    assert response.status_code == 400, response.text


def test_revoking_a_busy_worker_requeues_its_job_at_once(client: TestClient, provider, customer, agent: FakeAgent,  # type: ignore[no-untyped-def]
                                                         create_job, session: Session) -> None:
    job, a = placed(client, agent, create_job)
    assert client.post(f"/v1/workers/{agent.worker_id}/revoke", headers=provider.headers).status_code == 200
    body = job_of(client, customer, job["id"])
    assert body["status"] == "queued"
    assert agent.events(a["lease_id"], {"type": "log", "message": "x"}).status_code == 401


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


def test_a_heartbeat_is_a_few_kilobytes_at_most_and_is_kept_as_parsed(client: TestClient, agent: FakeAgent, app) -> None:  # type: ignore[no-untyped-def]
    huge = {"activity": "idle", "gpus": [{"uuid": f"GPU-{i}", "utilization_pct": 1.0} for i in range(400)]}
    refused = client.post("/v1/workers/heartbeat", json=huge, headers=agent.headers())
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "payload_too_large"
    spaced = b'{"activity":   "idle"' + b" " * 4000 + b"}"
    assert client.post("/v1/workers/heartbeat", content=spaced,
                       headers={**agent.headers(), "Content-Type": "application/json"}).status_code == 200
    kept = anyio.run(app.state.hot.latest, [agent.worker_id])[agent.worker_id]
    assert b"    " not in kept and json.loads(kept)["heartbeat"]["activity"] == "idle"  # parsed, not the raw body


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

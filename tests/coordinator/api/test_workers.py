"""`/v1/workers` over HTTP: registration, worker-token authentication, a provider's view and revocation,
heartbeats (buffered, batched, bounded) and the claim, on SQLite and PostgreSQL. The agent is
`tests.fakes.FakeAgent`: real HTTP, no training. A lease's routes are test_leases.py; the services behind them
are tested in tests/coordinator/services."""

from __future__ import annotations

import json

import anyio
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from coordinator.db.tables import LeaseModel, WorkerModel
from shared.protocol import PROTOCOL_HEADER
from tests.coordinator.api.conftest import job_of, placed
from tests.fakes import FakeAgent, registration


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


def test_a_known_workers_heartbeat_never_waits_for_the_database(client: TestClient, agent: FakeAgent,  # type: ignore[no-untyped-def]
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the token cache's freshness a heartbeat is answered from the cache while the token is checked again
    in the background: the database being slow (a sweep holding the connections) never shows in its latency."""
    import time  # noqa: PLC0415

    from coordinator import worker_tokens  # noqa: PLC0415
    from coordinator.api import deps  # noqa: PLC0415
    from coordinator.services import workers  # noqa: PLC0415

    monkeypatch.setattr(worker_tokens, "FRESH_S", 0.0)  # every call after the first finds the token stale
    assert agent.heartbeat().status_code == 200  # the token is now known
    checked = workers.authenticate
    checks: list[float] = []

    def slow(**kwargs):  # type: ignore[no-untyped-def]
        checks.append(time.monotonic())
        time.sleep(1.0)  # a database that answers late
        return checked(**kwargs)

    monkeypatch.setattr(workers, "authenticate", slow)
    began = time.monotonic()
    assert agent.heartbeat().status_code == 200 and agent.heartbeat().status_code == 200
    assert time.monotonic() - began < 0.5  # neither waited for the check
    deadline = time.monotonic() + 10
    while not (checks and not deps._refreshing) and time.monotonic() < deadline:  # noqa: SLF001
        time.sleep(0.05)
    assert len(checks) == 1  # one background check for the two calls


def test_a_worker_revoked_elsewhere_is_refused_once_the_background_check_ran(  # type: ignore[no-untyped-def]
        client: TestClient, agent: FakeAgent, provider, session: Session, settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Revoked through another API process (this one's cache not cleared): the stale token is trusted for one more
    call, checked behind it, then refused."""
    import time  # noqa: PLC0415

    from coordinator import worker_tokens  # noqa: PLC0415
    from coordinator.db.tables import AccountModel  # noqa: PLC0415
    from coordinator.services import workers  # noqa: PLC0415

    monkeypatch.setattr(worker_tokens, "FRESH_S", 0.0)
    assert agent.heartbeat().status_code == 200
    workers.revoke(session=session, account=session.get(AccountModel, provider.account_id),  # another process's
                   worker_id=agent.worker_id, settings=settings)
    assert agent.heartbeat().status_code == 200  # the one more call, answered from the cache
    deadline = time.monotonic() + 10
    while client.app.state.hot.tokens and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.05)  # the background check evicts the revoked token
    refused = agent.heartbeat()
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "worker_revoked"


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_token_one_process_confirmed_needs_no_database_in_another_until_revoked(  # type: ignore[no-untyped-def]
        settings, redis_url: str, make_caller, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two API processes on one Redis: a worker's first call to the second finds its token in hot state (the
    soak's heartbeat tail was each process's first look at each token, waiting for a database connection). A
    revocation removes it there, so a process that has not seen the token must ask the database, and refuses it;
    and it is announced, so a process that holds the token in its own cache drops it before the next call."""
    import time  # noqa: PLC0415

    import redis  # noqa: PLC0415

    from coordinator.app import create_app  # noqa: PLC0415
    from coordinator.services import workers  # noqa: PLC0415

    redis.Redis.from_url(redis_url).flushdb()
    shared = settings.model_copy(update={"redis_url": redis_url})
    apps = [create_app(shared) for _ in range(3)]
    try:
        with TestClient(apps[0]) as first, TestClient(apps[1]) as second, TestClient(apps[2]) as third:
            provider = make_caller("provider", "pat")
            agent = FakeAgent.register(first, provider.key)
            assert first.post("/v1/workers/heartbeat", json={"activity": "idle"}, headers=agent.headers()).status_code == 200
            checked = workers.authenticate

            def slow(**kwargs):  # type: ignore[no-untyped-def]
                time.sleep(1.0)  # a database that answers late: only a background check may wait for it
                return checked(**kwargs)

            monkeypatch.setattr(workers, "authenticate", slow)
            began = time.monotonic()
            answered = second.post("/v1/workers/heartbeat", json={"activity": "idle"}, headers=agent.headers())
            assert answered.status_code == 200 and time.monotonic() - began < 0.5
            monkeypatch.setattr(workers, "authenticate", checked)
            forged = agent.headers() | {"Authorization": f"Bearer {agent.token[:-4]}abcd"}  # the prefix, not the secret
            assert second.post("/v1/workers/heartbeat", json={"activity": "idle"}, headers=forged).status_code == 401
            deadline = time.monotonic() + 5
            while not apps[1].state.hot.tokens and time.monotonic() < deadline:
                time.sleep(0.02)  # the background check has confirmed it in the second process's own cache
            assert apps[1].state.hot.tokens.revocations_heard and len(apps[1].state.hot.tokens) == 1
            assert first.post(f"/v1/workers/{agent.worker_id}/revoke", headers=provider.headers).status_code == 200
            refused = third.post("/v1/workers/heartbeat", json={"activity": "idle"}, headers=agent.headers())
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "worker_revoked"
            while apps[1].state.hot.tokens and time.monotonic() < deadline + 5:
                time.sleep(0.02)  # announced: the second process evicts it without a call to prompt it
            for _ in range(2):  # (the first alone would be refused anyway: the revocation asked it to read the database)
                refused = second.post("/v1/workers/heartbeat", json={"activity": "idle"}, headers=agent.headers())
                assert refused.status_code == 401 and refused.json()["error"]["code"] == "worker_revoked"
    finally:
        for app in apps:
            app.state.engine.dispose()


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


def test_revoking_a_busy_worker_requeues_its_job_at_once(client: TestClient, provider, customer, agent: FakeAgent,  # type: ignore[no-untyped-def]
                                                         create_job, session: Session) -> None:
    job, a = placed(client, agent, create_job)
    assert client.post(f"/v1/workers/{agent.worker_id}/revoke", headers=provider.headers).status_code == 200
    body = job_of(client, customer, job["id"])
    assert body["status"] == "queued"
    assert agent.events(a["lease_id"], {"type": "log", "message": "x"}).status_code == 401


def test_a_heartbeat_is_a_few_kilobytes_at_most_and_is_kept_as_parsed(client: TestClient, agent: FakeAgent, app) -> None:  # type: ignore[no-untyped-def]
    huge = {"activity": "idle", "gpus": [{"uuid": f"GPU-{i}", "utilization_pct": 1.0} for i in range(400)]}
    refused = client.post("/v1/workers/heartbeat", json=huge, headers=agent.headers())
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "payload_too_large"
    spaced = b'{"activity":   "idle"' + b" " * 4000 + b"}"
    assert client.post("/v1/workers/heartbeat", content=spaced,
                       headers={**agent.headers(), "Content-Type": "application/json"}).status_code == 200
    kept = anyio.run(app.state.hot.latest, [agent.worker_id])[agent.worker_id]
    assert b"    " not in kept and json.loads(kept)["heartbeat"]["activity"] == "idle"  # parsed, not the raw body




@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_check_under_way_when_the_revocation_lands_shares_nothing(  # type: ignore[no-untyped-def]
        settings, redis_url: str, make_caller, monkeypatch: pytest.MonkeyPatch) -> None:
    """A background check that read the database before a revocation committed, and ends after it was heard,
    neither keeps the token nor writes it back to Redis, where a process started later would take it."""
    import threading  # noqa: PLC0415
    import time  # noqa: PLC0415

    import redis  # noqa: PLC0415

    from coordinator import worker_tokens  # noqa: PLC0415
    from coordinator.app import create_app  # noqa: PLC0415
    from coordinator.hotstate import TOKEN_PREFIX  # noqa: PLC0415
    from coordinator.services import workers  # noqa: PLC0415

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    monkeypatch.setattr(worker_tokens, "HEARD_FRESH_S", 0.0)  # every call after the first starts a background check
    monkeypatch.setattr(worker_tokens, "FRESH_S", 0.0)
    app = create_app(settings.model_copy(update={"redis_url": redis_url}))
    try:
        with TestClient(app) as api:
            provider = make_caller("provider", "pat")
            agent = FakeAgent.register(api, provider.key)
            assert api.post("/v1/workers/heartbeat", json={"activity": "idle"}, headers=agent.headers()).status_code == 200
            checked, reading, release = workers.authenticate, threading.Event(), threading.Event()

            def slow(**kwargs):  # type: ignore[no-untyped-def]
                found = checked(**kwargs)  # the read, before the revocation
                reading.set()
                release.wait(10)
                return found

            monkeypatch.setattr(workers, "authenticate", slow)
            assert api.post("/v1/workers/heartbeat", json={"activity": "idle"}, headers=agent.headers()).status_code == 200
            assert reading.wait(10)
            monkeypatch.setattr(workers, "authenticate", checked)
            assert api.post(f"/v1/workers/{agent.worker_id}/revoke", headers=provider.headers).status_code == 200
            release.set()
            time.sleep(0.5)  # the background check ends
            assert client.keys(f"{TOKEN_PREFIX}*") == []
            refused = api.post("/v1/workers/heartbeat", json={"activity": "idle"}, headers=agent.headers())
            assert refused.status_code == 401
    finally:
        app.state.engine.dispose()

"""Cheating providers against a real coordinator (`tunegrid-coordinator serve`, SQLite), speaking the real worker
protocol over HTTP: a false user error, a price gouge, a preemption loop and a suspended provider's new machine id.
Each paid or went unnoticed before issue 16; now none pays, the honest worker gets the job, and the ledger audit
stays clean."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.e2e.conftest import LiveServer
from tests.e2e.test_agent import submit
from tests.fakes import FakeAgent
from tests.security.conftest import audit_is_clean, database, direct_key

pytestmark = pytest.mark.live


def _usage(server: LiveServer, lease_id: str) -> tuple[int, int, str]:
    """What the lease was charged, what its provider earned, and the rule (from the coordinator's database)."""
    engine = create_engine(database(server))
    with engine.connect() as conn:
        row = conn.execute(text("SELECT charge_micros, provider_micros, rule FROM usage_records WHERE lease_id = :l"),
                           {"l": lease_id}).one()
    engine.dispose()
    return int(row[0]), int(row[1]), str(row[2])


def _worker(http: httpx.Client, provider: str, worker_id: str) -> dict:  # type: ignore[type-arg]
    return http.get(f"/v1/workers/{worker_id}", headers={"Authorization": f"Bearer {provider}"}).json()


@contextmanager
def clients(coordinator: LiveServer, name: str) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """(a worker-side client, a new customer's client); the customer's unfinished jobs are cancelled after, so the
    next attack's workers find nothing of this one's queued."""
    customer = direct_key(coordinator, "customer", f"customer-{name}")
    with httpx.Client(base_url=coordinator.url, timeout=30) as http, \
            httpx.Client(base_url=coordinator.url, headers={"Authorization": f"Bearer {customer}"}, timeout=30) as client:
        try:
            yield http, client
        finally:
            for job in client.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]:
                if job["status"] in ("queued", "running", "paused"):
                    client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")


def finished_elsewhere(coordinator: LiveServer, http: httpx.Client, job: dict, name: str, **fields: str) -> None:  # type: ignore[type-arg]
    """An honest worker of a new provider takes the job next and finishes it."""
    honest = FakeAgent.register(http, direct_key(coordinator, "provider", name), machine_id=f"{name}-pc", **fields)
    b = honest.claim(wait_s=5)
    assert b is not None and b["job_id"] == job["id"]
    assert honest.finish(b["lease_id"]).json()["job_status"] == "succeeded"


def test_a_false_user_error_is_neither_billed_nor_paid_and_the_job_trains_elsewhere(coordinator: LiveServer) -> None:
    with clients(coordinator, "liar") as (http, client):
        liar_key = direct_key(coordinator, "provider", "liar")
        liar = FakeAgent.register(http, liar_key, machine_id="liar-pc")
        job = submit(client, examples=24, hyperparameters={"n_epochs": 2, "batch_size": 2})
        a = liar.claim(wait_s=5)
        assert a is not None and a["job_id"] == job["id"]
        assert liar.progress(a["lease_id"], step=3).status_code == 200
        before = _worker(http, liar_key, liar.worker_id)["reliability"]
        usage = {"wall_seconds": 3600.0, "gpu_seconds": 3600.0}
        assert liar.fail(a["lease_id"], kind="user_error", message="your data is bad", usage=usage).status_code == 200

        after = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        assert after["status"] == "queued" and after["error"] is None  # not the customer's fault, yet
        assert _usage(coordinator, a["lease_id"]) == (0, 0, "not_billed")
        seen = _worker(http, liar_key, liar.worker_id)
        assert seen["unconfirmed_claims"] == 1 and seen["reliability"] < before
        assert FakeAgent.register(http, liar_key, machine_id="liar-pc-2").claim(wait_s=1) is None  # no second opinion

        finished_elsewhere(coordinator, http, job, "honest")
    audit_is_clean(coordinator)


def test_a_user_error_two_providers_report_fails_the_job_as_the_customers(coordinator: LiveServer) -> None:
    with clients(coordinator, "bad-data") as (http, client):
        first_key, second_key = direct_key(coordinator, "provider", "first"), direct_key(coordinator, "provider", "second")
        first = FakeAgent.register(http, first_key, machine_id="first-pc")
        job = submit(client, examples=24)
        a = first.claim(wait_s=5)
        assert a is not None and first.progress(a["lease_id"]).status_code == 200
        first.fail(a["lease_id"], kind="user_error", message="no example fits max_seq_len")
        second = FakeAgent.register(http, second_key, machine_id="second-pc")
        b = second.claim(wait_s=5)
        assert b is not None and second.progress(b["lease_id"]).status_code == 200
        second.fail(b["lease_id"], kind="user_error", message="no example fits max_seq_len")
        done = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        assert done["status"] == "failed" and done["error"]["code"] == "invalid_training_data"
        assert _usage(coordinator, a["lease_id"])[:2] == (0, 0) and _usage(coordinator, b["lease_id"])[2] == "until_end"
        assert _worker(http, first_key, first.worker_id)["unconfirmed_claims"] == 0  # confirmed: no longer held against it
    audit_is_clean(coordinator)


def test_a_price_gouger_never_gets_a_job_that_named_no_cap(coordinator: LiveServer) -> None:
    with clients(coordinator, "gouged") as (http, client):
        gouger = FakeAgent.register(http, direct_key(coordinator, "provider", "gouger"), machine_id="gouger-pc", price="1000")
        job = submit(client, examples=24)
        assert job["max_price_source"] == "market" and float(job["max_price_per_gpu_hour"]) <= 10.0
        assert gouger.claim(wait_s=1) is None
        quote = client.post("/v1/fine_tuning/quotes", json={"model": "tunegrid/tiny-llama", "training_tokens": 1000}).json()
        assert quote["max_price_source"] == "market" and quote["workers_available"] == 0
        finished_elsewhere(coordinator, http, job, "fair", price="0.30")
        assert gouger.claim(wait_s=0) is None
    audit_is_clean(coordinator)


def test_a_preemption_loop_costs_the_worker_and_the_job_moves_on(coordinator: LiveServer) -> None:
    with clients(coordinator, "looped") as (http, client):
        looper_key = direct_key(coordinator, "provider", "looper")
        looper = FakeAgent.register(http, looper_key, machine_id="looper-pc")
        job = submit(client, examples=24)
        before = _worker(http, looper_key, looper.worker_id)["reliability"]
        for _ in range(2):
            a = looper.claim(wait_s=5)
            assert a is not None and a["job_id"] == job["id"]
            assert looper.progress(a["lease_id"]).status_code == 200
            assert looper.preempted(a["lease_id"], reason="a game started").status_code == 200
        seen = _worker(http, looper_key, looper.worker_id)
        assert (seen["preempted_leases"], seen["preemption_strikes"]) == (2, 1) and seen["reliability"] < before
        assert looper.claim(wait_s=1) is None  # off this job for good
        events = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100").json()["data"]]
        assert any("is not placed on it again" in m for m in events), events
        finished_elsewhere(coordinator, http, job, "steady")
    audit_is_clean(coordinator)


def test_a_suspended_providers_new_machine_id_is_suspended_and_keeps_the_record(coordinator: LiveServer) -> None:
    with clients(coordinator, "escape") as (http, client):
        shady_key = direct_key(coordinator, "provider", "shady")
        old = FakeAgent.register(http, shady_key, machine_id="old-pc")
        job = submit(client, examples=24)
        a = old.claim(wait_s=5)
        assert a is not None and old.fail(a["lease_id"], message="CUDA error").status_code == 200
        record = _worker(http, shady_key, old.worker_id)["reliability"]
        coordinator.cli("workers", "suspend", "--worker", old.worker_id, "--reason", "tampered adapters")

        new = FakeAgent.register(http, shady_key, machine_id="brand-new-pc")
        seen = _worker(http, shady_key, new.worker_id)
        assert seen["suspended"] and seen["state"] == "suspended" and old.worker_id in seen["pause_reason"]
        assert seen["reliability"] == pytest.approx(record)  # starts from the provider's record, not afresh
        assert new.claim(wait_s=1) is None
        finished_elsewhere(coordinator, http, job, "clean")
    audit_is_clean(coordinator)

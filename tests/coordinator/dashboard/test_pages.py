"""The dashboard over HTTP (no browser): logins into signed cookies, CSRF on every form, admins only under
/admin, pages with real data, CSV exports, and the admin actions (cancel, suspend, refund as a ledger entry)."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from coordinator.dashboard.sessions import COOKIE
from coordinator.db.tables import Book, LeaseModel, WorkerModel, WorkerState, utcnow
from coordinator.services import ledger
from shared.money import usd_to_micros
from tests.fakes import FakeAgent, adapter_archive


def login(client: TestClient, key: str, next_page: str = "/admin") -> object:
    form = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
    return client.post("/login", data={"api_key": key, "csrf_token": token, "next": next_page}, follow_redirects=False)


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)  # type: ignore[union-attr]


@pytest.fixture
def admin(make_caller):  # type: ignore[no-untyped-def]
    return make_caller("admin", "root")


@pytest.fixture
def ran(client: TestClient, session: Session, make_caller, create_job):  # type: ignore[no-untyped-def]
    """One job that trained for ten minutes and succeeded on a fake worker, and one still queued."""
    provider = make_caller("provider", "pat")
    agent = FakeAgent.register(client, provider.key)
    done = create_job().json()
    a = agent.claim(wait_s=2)
    assert a is not None and agent.progress(a["lease_id"], step=1, loss=2.5).status_code == 200
    agent.progress(a["lease_id"], step=2, loss=2.1)
    session.execute(update(LeaseModel).where(LeaseModel.id == a["lease_id"]).values(
        training_started_at=utcnow() - timedelta(minutes=10)))
    session.commit()
    adapter = adapter_archive()
    agent.upload(a["lease_id"], "adapter", adapter)
    assert agent.complete(a["lease_id"], adapter, usage={"wall_seconds": 700.0, "gpu_seconds": 650.0}).status_code == 200
    queued = create_job().json()
    return {"done": done["id"], "queued": queued["id"], "worker": agent.worker_id}


def test_pages_need_a_session_and_admin_pages_an_admin(client: TestClient, admin, customer) -> None:  # type: ignore[no-untyped-def]
    for path in ("/admin/costs", "/admin/fleet", "/admin/jobs", "/admin/costs.csv", "/dashboard"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"].startswith("/login")
    bad = login(client, "tg_000000000000_nope")
    assert bad.status_code == 401 and "not valid" in bad.text  # type: ignore[attr-defined]
    as_customer = login(client, customer.key)
    assert as_customer.status_code == 303 and as_customer.headers["location"] == "/dashboard"  # type: ignore[attr-defined]
    cookie = as_customer.cookies[COOKIE]  # type: ignore[attr-defined]
    header = as_customer.headers["set-cookie"].lower()  # type: ignore[attr-defined]
    assert "httponly" in header and "samesite=strict" in header
    assert client.get("/admin/costs").status_code == 403
    assert client.get("/admin/costs.csv").status_code == 403
    assert client.get("/dashboard").status_code == 200
    client.cookies.clear()
    client.cookies.set(COOKIE, cookie[:-2] + ("xx" if not cookie.endswith("xx") else "yy"))  # tampered
    assert client.get("/dashboard", follow_redirects=False).status_code == 303


def test_login_needs_the_forms_token(client: TestClient, admin) -> None:  # type: ignore[no-untyped-def]
    client.get("/login")
    forged = client.post("/login", data={"api_key": admin.key, "csrf_token": "guess"}, follow_redirects=False)
    assert forged.status_code == 400 and COOKIE not in forged.cookies


def test_admin_pages_show_real_data(client: TestClient, admin, ran) -> None:  # type: ignore[no-untyped-def]
    assert login(client, admin.key).status_code == 303  # type: ignore[attr-defined]
    costs = client.get("/admin/costs")
    assert costs.status_code == 200 and 'class="bar"' in costs.text and "rtx-4090" in costs.text
    assert float(costs.headers["server-timing"].split("dur=")[1]) > 0
    csv = client.get("/admin/costs.csv?table=jobs")
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    assert ran["done"] in csv.text and csv.text.splitlines()[0] == "job_id,customer_id,model,spend_usd,seconds"
    assert client.get("/admin/costs.csv?table=secrets").status_code == 400
    assert client.get("/admin/costs?start=2026-13-01").status_code == 400
    assert client.get("/admin/costs?end=9999-12-31").status_code == 200  # the last day has no next day
    assert client.get("/admin/costs?end=0001-01-01").status_code == 400  # nor the first 30 before it
    assert client.get("/admin/costs.csv?table=days&end=9999-12-31").status_code == 200
    fleet_csv = client.get("/admin/fleet?format=csv")
    assert fleet_csv.headers["content-type"].startswith("text/csv") and ran["worker"] in fleet_csv.text
    jobs_csv = client.get("/admin/jobs?format=csv&status=queued")
    assert ran["queued"] in jobs_csv.text and ran["done"] not in jobs_csv.text
    fleet = client.get("/admin/fleet?state=idle")
    assert fleet.status_code == 200 and ran["worker"] in fleet.text
    assert client.get("/admin/fleet?sort=password").status_code == 400
    jobs = client.get("/admin/jobs?status=queued")
    assert ran["queued"] in jobs.text and ran["done"] not in jobs.text
    by_worker = client.get(f"/admin/jobs?worker={ran['worker']}")
    assert ran["done"] in by_worker.text and ran["queued"] not in by_worker.text
    job = client.get(f"/admin/jobs/{ran['done']}")
    assert job.status_code == 200 and "LoRA parameters" in job.text and "until_end" in job.text
    assert 'class="line line-0"' in job.text  # the loss curve
    assert client.get("/admin/jobs/ftjob-nope").status_code == 404


def test_admin_actions_need_csrf_and_do_their_job(client: TestClient, session: Session, admin, ran, customer) -> None:  # type: ignore[no-untyped-def]
    login(client, admin.key)
    page = client.get(f"/admin/jobs/{ran['queued']}").text
    refused = client.post(f"/admin/jobs/{ran['queued']}/cancel", data={"csrf_token": "wrong"}, follow_redirects=False)
    assert refused.status_code == 400
    cross_site = client.post(f"/admin/jobs/{ran['queued']}/cancel", data={"csrf_token": csrf_of(page)},
                             headers={"Origin": "https://evil.example"}, follow_redirects=False)
    assert cross_site.status_code == 400
    assert client.post(f"/admin/jobs/{ran['queued']}/cancel", data={"csrf_token": csrf_of(page)},
                       follow_redirects=False).status_code == 303
    assert client.get(f"/v1/fine_tuning/jobs/{ran['queued']}", headers=customer.headers).json()["status"] == "cancelled"

    before = ledger.balance(session, Book.customer_available, customer.account_id)
    charged = usd_to_micros(client.get(f"/v1/fine_tuning/jobs/{ran['done']}", headers=customer.headers).json()["cost"])
    form = {"csrf_token": csrf_of(page), "amount": "0.000001", "nonce": "n-12345678", "reason": "test"}
    assert client.post(f"/admin/jobs/{ran['done']}/refund", data=form, follow_redirects=False).status_code == 303
    assert client.post(f"/admin/jobs/{ran['done']}/refund", data=form, follow_redirects=False).status_code == 303  # resubmitted
    assert ledger.balance(session, Book.customer_available, customer.account_id) == before + 1
    too_much = {**form, "amount": str(charged), "nonce": "n-87654321"}  # 1 micro already refunded
    assert client.post(f"/admin/jobs/{ran['done']}/refund", data=too_much, follow_redirects=False).status_code == 400
    assert ledger.audit(session).ok

    assert client.post(f"/admin/workers/{ran['worker']}/suspend", data={"csrf_token": csrf_of(page)},
                       follow_redirects=False).status_code == 303
    session.expire_all()
    assert session.get(WorkerModel, ran["worker"]).state is WorkerState.suspended  # type: ignore[union-attr]

    logout = client.post("/logout", data={"csrf_token": csrf_of(page)}, follow_redirects=False)
    assert logout.status_code == 303
    assert client.get("/admin/costs", follow_redirects=False).status_code == 303


def test_customers_and_providers_see_their_own(client: TestClient, ran, customer, other_customer, make_caller) -> None:  # type: ignore[no-untyped-def]
    login(client, customer.key)
    own = client.get("/dashboard")
    assert own.status_code == 200 and ran["done"] in own.text and "Available" in own.text
    assert client.get(f"/dashboard/jobs/{ran['done']}").status_code == 200
    client.cookies.clear()
    login(client, other_customer.key)
    assert ran["done"] not in client.get("/dashboard").text
    assert client.get(f"/dashboard/jobs/{ran['done']}").status_code == 404
    client.cookies.clear()
    provider = make_caller("provider", "pat2")
    login(client, provider.key)
    assert "Your workers" in client.get("/dashboard").text

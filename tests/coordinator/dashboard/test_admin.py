"""`/admin` (coordinator/dashboard/admin.py) over HTTP: pages with real data, CSV exports, and the admin actions
(cancel, suspend, refund as a ledger entry), each behind CSRF."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from coordinator.db.tables import Book, WorkerModel, WorkerState
from coordinator.services import ledger
from shared.money import usd_to_micros

from tests.coordinator.dashboard.conftest import csrf_of, login


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

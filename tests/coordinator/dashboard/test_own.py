"""`/dashboard` (coordinator/dashboard/own.py) over HTTP: customers and providers see their own, and only their own."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.coordinator.dashboard.conftest import login


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


def test_a_jobs_page_shows_its_evaluation_side_by_side(client: TestClient, session, ran, customer) -> None:  # type: ignore[no-untyped-def]
    from coordinator.db.tables import JobModel  # noqa: PLC0415

    job = session.get(JobModel, ran["done"])
    job.evaluation = {"examples": 1, "base_batch_id": "batch_none", "tuned_batch_id": "batch_none2",
                      "references": [{"custom_id": "eval-0", "prompt": "What is <b>2</b> plus 2?", "reference": "4"}]}
    session.commit()
    login(client, customer.key)
    page = client.get(f"/dashboard/jobs/{ran['done']}")
    assert page.status_code == 200 and 'id="evaluation"' in page.text
    assert "What is &lt;b&gt;2&lt;/b&gt; plus 2?" in page.text  # escaped: a customer's text is never markup

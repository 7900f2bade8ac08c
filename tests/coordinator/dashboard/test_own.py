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

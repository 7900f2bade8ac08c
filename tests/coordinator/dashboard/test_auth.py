"""`coordinator/dashboard/auth.py` and the guard every page goes through (`pages.py`): logins into signed
cookies with the form's CSRF token, no session to the login page, admins only under /admin."""

from __future__ import annotations

from fastapi.testclient import TestClient

from coordinator.dashboard.sessions import COOKIE

from tests.coordinator.dashboard.conftest import login


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


def test_a_csrf_token_of_any_text_is_refused_not_a_crash(client: TestClient, admin) -> None:  # type: ignore[no-untyped-def]
    form = client.get("/login")
    assert form.status_code == 200
    refused = client.post("/login", data={"api_key": admin.key, "csrf_token": "é" * 10, "next": "/admin"},
                          follow_redirects=False)
    assert refused.status_code == 400
    assert login(client, admin.key).status_code == 303  # type: ignore[attr-defined]
    logout = client.post("/logout", data={"csrf_token": "é" * 10}, follow_redirects=False)
    assert logout.status_code == 400

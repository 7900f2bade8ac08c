"""Dashboard test fixtures: logging in through the form, the CSRF token of a page, an admin, and a marketplace
that ran one job (over HTTP, with a fake worker)."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from coordinator.db.tables import LeaseModel, utcnow
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

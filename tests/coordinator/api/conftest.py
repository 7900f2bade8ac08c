"""Fixtures for the HTTP tests of the worker protocol: a provider, its registered `FakeAgent`, and a job placed
on it."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.fakes import FakeAgent


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

"""Attacks replayed against real processes: one coordinator (`tunegrid-coordinator serve`, SQLite) per module,
malicious workers speaking the real protocol over HTTP, and real victim agents."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import LiveServer, _free_port, start_server, stop_server, tiny_model  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("coordinator")
    port = _free_port()
    env = {**os.environ, "TUNEGRID_DATA_DIR": str(root / "data"), "TUNEGRID_PORT": str(port),
           "TUNEGRID_LOG_LEVEL": "warning", "TUNEGRID_CHECKPOINT_EVERY_STEPS": "2",
           "TUNEGRID_SUSPEND_AFTER_FAILED_CHECKS": "50"}
    env.pop("TUNEGRID_DATABASE_URL", None)
    server = LiveServer(url=f"http://127.0.0.1:{port}", env=env)
    process = start_server(env, root / "server.log", server.url)
    try:
        yield server
    finally:
        stop_server(process)


def storage(server: LiveServer) -> Path:
    return Path(server.env["TUNEGRID_DATA_DIR"]) / "storage"


def database(server: LiveServer) -> str:
    return f"sqlite:///{Path(server.env['TUNEGRID_DATA_DIR']) / 'tunegrid.db'}"


@pytest.fixture(autouse=True)
def _fresh_fleet(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each attack starts with no worker placeable: the previous test's workers are revoked after it."""
    yield
    if "coordinator" not in request.fixturenames:
        return
    import httpx  # noqa: PLC0415

    server: LiveServer = request.getfixturevalue("coordinator")
    admin = {"Authorization": f"Bearer {server.new_key('admin', 'root')}"}
    with httpx.Client(base_url=server.url, headers=admin, timeout=30) as http:
        for worker in http.get("/v1/workers", params={"limit": 100}).json()["data"]:
            if not worker["revoked"]:
                http.post(f"/v1/workers/{worker['id']}/revoke")

"""A real coordinator process (`tunegrid-coordinator serve`, uvicorn) per test, on SQLite or PostgreSQL."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from tests.conftest import built_tiny_model, truncate_all

BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    env: dict[str, str]

    def cli(self, *args: str) -> str:
        done = subprocess.run([str(BIN / "tunegrid-coordinator"), *args], env=self.env, capture_output=True,
                              text=True, timeout=60, check=True)
        return done.stdout

    @property
    def database_url(self) -> str:
        return self.env.get("TUNEGRID_DATABASE_URL") or f"sqlite:///{Path(self.env['TUNEGRID_DATA_DIR']) / 'tunegrid.db'}"

    def new_key(self, role: str, name: str, credit: str = "100") -> str:
        """A new account's key, written straight into the coordinator's database by the services the CLI calls
        (`tunegrid-coordinator keys create` and `credits grant`, tested in tests/e2e/test_cli.py and
        tests/coordinator/test_cli.py), without a process start per key; a customer gets `credit` granted."""
        from coordinator.db.engine import make_engine, make_sessionmaker  # noqa: PLC0415
        from coordinator.db.tables import Role  # noqa: PLC0415
        from coordinator.services import billing  # noqa: PLC0415
        from coordinator.services.keys import create_account_with_key  # noqa: PLC0415
        from coordinator.settings import CoordinatorSettings  # noqa: PLC0415
        from shared.money import usd_to_micros  # noqa: PLC0415

        engine = make_engine(CoordinatorSettings(database_url=self.database_url))
        try:
            with make_sessionmaker(engine)() as session:
                created = create_account_with_key(session=session, name=name, role=Role(role))
                if role == "customer" and credit:
                    billing.grant(session=session, account=created.account, amount=usd_to_micros(credit),
                                  key=f"test-{created.account.id}", memo="test credit")
                session.commit()
                return created.key
        finally:
            engine.dispose()

    def migrate(self) -> None:
        """`tunegrid-coordinator migrate`, in this process (the CLI's own path: tests/coordinator/test_cli.py)."""
        from coordinator.db.migrate import upgrade_head  # noqa: PLC0415

        upgrade_head(self.database_url)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama and its tokenizer, built locally once per run (nothing is downloaded)."""
    return built_tiny_model(tmp_path_factory)


@pytest.fixture
def live_env() -> dict[str, str]:
    """Extra environment for the live coordinator; a test module overrides this fixture to configure it."""
    return {}


@pytest.fixture
def live_server(backend: str, request: pytest.FixtureRequest, tmp_path: Path, live_env: dict[str, str]) -> Iterator[LiveServer]:
    port = _free_port()
    env = {**os.environ, "TUNEGRID_DATA_DIR": str(tmp_path / "data"), "TUNEGRID_PORT": str(port),
           "TUNEGRID_LOG_LEVEL": "warning", **live_env}
    env.pop("TUNEGRID_DATABASE_URL", None)
    postgres_url = None
    if backend == "postgresql":
        postgres_url = request.getfixturevalue("postgres_url")
        env["TUNEGRID_DATABASE_URL"] = postgres_url
    server = LiveServer(url=f"http://127.0.0.1:{port}", env=env)
    if postgres_url:
        server.migrate()
    process = start_server(env, tmp_path / "server.log", server.url)
    try:
        yield server
    finally:
        stop_server(process)
        if postgres_url:
            truncate_all(postgres_url)


def start_server(env: dict[str, str], log_path: Path, url: str) -> subprocess.Popen[bytes]:
    """`tunegrid-coordinator serve` with `env`, returned once /healthz answers."""
    with log_path.open("w") as log:
        process = subprocess.Popen([str(BIN / "tunegrid-coordinator"), "serve"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_server(process)
            raise RuntimeError(f"coordinator did not start:\n{log_path.read_text()}")
        time.sleep(0.1)


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


def until(what: str, check, timeout: float = 240.0, pause: float = 0.3):  # type: ignore[no-untyped-def]
    """`check()`'s first answer that is not None, polled until `timeout` (then the test fails saying `what`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found is not None:
            return found
        time.sleep(pause)
    raise AssertionError(f"timed out waiting for {what}")

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
    admin = {"Authorization": f"Bearer {direct_key(server, 'admin', 'root')}"}
    with httpx.Client(base_url=server.url, headers=admin, timeout=30) as http:
        for worker in http.get("/v1/workers", params={"limit": 100}).json()["data"]:
            if not worker["revoked"]:
                http.post(f"/v1/workers/{worker['id']}/revoke")


TRAINER_IMAGE = os.environ.get("TUNEGRID_TEST_TRAINER_IMAGE", "tunegrid/trainer:latest")


@pytest.fixture(scope="session")
def trainer_image() -> str:
    """The real trainer image (worker/trainer/Dockerfile), built by `make trainer-image` (.ci/run builds it when
    missing). Outside CI a missing engine or image skips; under CI=true it fails."""
    from tests.conftest import IN_CI  # noqa: PLC0415

    try:
        import docker  # noqa: PLC0415

        docker.from_env(timeout=10).images.get(TRAINER_IMAGE)
    except Exception as exc:  # noqa: BLE001 - no engine, or no image
        reason = f"no trainer image {TRAINER_IMAGE} ({exc.__class__.__name__}); `make trainer-image` builds it"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return TRAINER_IMAGE


def docker_runtime(image: str):  # type: ignore[no-untyped-def]
    from worker.runtimes.docker import DockerRuntime  # noqa: PLC0415

    return DockerRuntime(image=image, memory_bytes=3 * 1024**3, cpus=1)  # one torch thread: the suite runs two at once


def watch_sandbox(runtime) -> dict:  # type: ignore[no-untyped-def, type-arg]
    """Record how the Docker engine runs each trainer `runtime` starts (its host config and user) and the job
    folder's mode and owner, for the test to check the sandbox."""
    seen: dict = {}  # type: ignore[type-arg]
    start = runtime.start

    def watched(mount):  # type: ignore[no-untyped-def]
        running = start(mount)
        running._container.reload()  # noqa: SLF001 - the container as the engine runs it
        seen.update(host=running._container.attrs["HostConfig"], user=running._container.attrs["Config"]["User"],  # noqa: SLF001
                    mode=mount.job_dir.stat().st_mode & 0o777, uid=mount.job_dir.stat().st_uid)
        return running

    runtime.start = watched
    return seen


def assert_sandboxed(seen: dict) -> None:  # type: ignore[type-arg]
    """No network, a read-only root, no capabilities, the limits, a non-root user, a job folder that is its own."""
    host = seen["host"]
    assert host["NetworkMode"] == "none" and host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
    assert host["Memory"] == 3 * 1024**3 and host["PidsLimit"] == 512
    assert seen["user"] == "10001:10001" and seen["mode"] == 0o700 and seen["uid"] == 10001


def direct_key(server: LiveServer, role: str, name: str, credit: str = "100") -> str:
    """A new account's key, written straight into the live coordinator's database (`LiveServer.new_key`)."""
    return server.new_key(role, name, credit)


def audit_is_clean(server: LiveServer) -> None:
    """The live coordinator's ledger audit (as `tunegrid-coordinator ledger audit` runs it) finds nothing."""
    from coordinator.db.engine import make_engine, make_sessionmaker  # noqa: PLC0415
    from coordinator.services import ledger  # noqa: PLC0415
    from coordinator.settings import CoordinatorSettings  # noqa: PLC0415

    engine = make_engine(CoordinatorSettings(database_url=database(server)))
    try:
        with make_sessionmaker(engine)() as session:
            result = ledger.audit(session)
        assert result.ok, result
    finally:
        engine.dispose()

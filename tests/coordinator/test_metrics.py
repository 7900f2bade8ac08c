"""`GET /metrics` (coordinator/metrics.py): off without a token and closed to anyone without it; after a job is
placed, trained and settled, the counters moved by exactly what the database recorded, the queue's gauges read the
database, and a rolled-back transaction counts nothing."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.app import create_app
from coordinator.db.tables import LedgerPostingModel, LedgerTransactionModel
from coordinator.metrics import LEASES_STARTED, count_on_commit
from coordinator.settings import CoordinatorSettings
from tests.coordinator.api.conftest import placed
from tests.fakes import FakeAgent

TOKEN = "scrape-me-7a1f"
SCRAPE = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def settings(settings: CoordinatorSettings) -> CoordinatorSettings:
    return settings.model_copy(update={"metrics_token": TOKEN})


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answered = client.get("/metrics", headers=SCRAPE)
    assert answered.status_code == 200 and answered.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answered.text) for sample in family.samples}


def value(figures: dict, name: str, **labels: str) -> float:
    return figures.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_are_off_without_a_token_and_closed_without_it(client: TestClient,
                                                               settings: CoordinatorSettings) -> None:
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer scrape-me-7a1e"}).status_code == 401
    assert client.get("/metrics", headers=SCRAPE).status_code == 200
    off = create_app(settings.model_copy(update={"metrics_token": None}))
    with TestClient(off, raise_server_exceptions=False) as bare:
        answered = bare.get("/metrics", headers=SCRAPE)
        assert answered.status_code == 404 and "TUNEGRID_METRICS_TOKEN" in answered.json()["error"]["message"]
    off.state.engine.dispose()


def test_a_job_moves_the_counters_by_what_the_database_recorded(client: TestClient, session: Session, make_caller,  # type: ignore[no-untyped-def]
                                                                create_job) -> None:
    agent = FakeAgent.register(client, make_caller("provider", "pat").key)

    def ledger() -> tuple[int, int]:
        session.expire_all()
        return (session.scalar(select(func.count()).select_from(LedgerTransactionModel)) or 0,
                session.scalar(select(func.count()).select_from(LedgerPostingModel)) or 0)

    before, books_before = scrape(client), ledger()
    job, assignment = placed(client, agent, create_job)
    during = scrape(client)
    assert value(during, "tunegrid_jobs", status="running", kind="fine_tuning") == 1
    assert value(during, "tunegrid_workers", state="working") == 1
    assert agent.finish(assignment["lease_id"]).status_code == 200
    after, books_after = scrape(client), ledger()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("tunegrid_leases_started_total", kind="train") == 1
    assert moved("tunegrid_leases_ended_total", kind="train", status="completed") == 1
    assert sum(v for (name, _), v in after.items() if name == "tunegrid_ledger_transactions_total") - \
        sum(v for (name, _), v in before.items() if name == "tunegrid_ledger_transactions_total") == \
        books_after[0] - books_before[0] > 0
    assert moved("tunegrid_ledger_postings_total") == books_after[1] - books_before[1] > 0
    assert moved("tunegrid_http_request_duration_seconds_count", method="POST", route="/v1/fine_tuning/jobs",
                 status="200") == 1
    assert moved("tunegrid_http_request_duration_seconds_count", method="POST",
                 route="/v1/workers/leases/{lease_id}/complete", status="200") == 1
    assert value(after, "tunegrid_jobs", status="running", kind="fine_tuning") == 0
    assert value(after, "tunegrid_jobs", status="queued", kind="fine_tuning") == 0  # present, at zero
    assert value(after, "tunegrid_outbox_messages", status="pending") == 0
    assert job["id"]


def test_a_rolled_back_transaction_counts_nothing(session: Session) -> None:
    counted = LEASES_STARTED.labels(kind="probe")._value.get()  # noqa: SLF001 - the counter's own figure
    session.execute(select(func.count()).select_from(LedgerTransactionModel))  # a transaction, as a service has
    count_on_commit(session, LEASES_STARTED, kind="probe")
    with session.begin_nested():  # a savepoint rolled back inside it keeps the outer transaction's counts
        pass
    session.rollback()
    session.commit()
    assert LEASES_STARTED.labels(kind="probe")._value.get() == counted  # noqa: SLF001
    count_on_commit(session, LEASES_STARTED, kind="probe")
    session.commit()
    assert LEASES_STARTED.labels(kind="probe")._value.get() == counted + 1  # noqa: SLF001


def test_api_processes_of_one_host_are_summed_in_multiprocess_mode(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`serve --workers N` (compose's api): with PROMETHEUS_MULTIPROC_DIR each process writes its counts there and
    a scrape answered by any one of them sums them all. Real processes."""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    count = "from coordinator.metrics import LEASES_STARTED; LEASES_STARTED.labels(kind='train').inc({})"
    for amount in (2, 3):
        subprocess.run([sys.executable, "-c", count.format(amount)], env=env, check=True, timeout=60)
    scrape = ("from sqlalchemy import create_engine; from sqlalchemy.orm import Session; "
              "from coordinator.db.tables import Base; from coordinator.metrics import exposition; "
              "engine = create_engine('sqlite://'); Base.metadata.create_all(engine); "
              "print(exposition(Session(engine)).decode())")
    text = subprocess.run([sys.executable, "-c", scrape], env=env, check=True, timeout=60, capture_output=True,
                          text=True).stdout
    figures = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert figures[("tunegrid_leases_started_total", (("kind", "train"),))] == 5
    assert ("tunegrid_jobs", (("kind", "fine_tuning"), ("status", "queued"))) in figures


def test_claims_heartbeat_ages_and_celery_tasks_are_measured(client: TestClient, make_caller, create_job,  # type: ignore[no-untyped-def]
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             settings: CoordinatorSettings) -> None:
    from coordinator import tasks  # noqa: PLC0415

    agent = FakeAgent.register(client, make_caller("provider", "pat").key)
    before = scrape(client)
    assert agent.claim(wait_s=0) is None
    placed(client, agent, create_job)
    after = scrape(client)
    for outcome in ("empty", "assigned"):
        assert value(after, "tunegrid_claim_duration_seconds_count", outcome=outcome) - \
            value(before, "tunegrid_claim_duration_seconds_count", outcome=outcome) == 1
    # The worker was heard from when it registered: one age, a few seconds at most.
    assert value(after, "tunegrid_worker_heartbeat_age_seconds_count") == 1
    assert value(after, "tunegrid_worker_heartbeat_age_seconds_bucket", le="5.0") == 1

    monkeypatch.setattr(tasks, "_runtime", lambda: (settings, client.app.state.sessionmaker, None))  # type: ignore[attr-defined]

    def broken(*, session, settings):  # type: ignore[no-untyped-def]
        raise RuntimeError("the database went away")

    assert tasks._run_task(tasks.place_queued_jobs) >= 0  # noqa: SLF001
    with pytest.raises(RuntimeError):
        tasks._run_task(broken)  # noqa: SLF001
    later = scrape(client)
    assert value(later, "tunegrid_celery_tasks_total", task="place_queued_jobs", outcome="success") - \
        value(after, "tunegrid_celery_tasks_total", task="place_queued_jobs", outcome="success") == 1
    assert value(later, "tunegrid_celery_tasks_total", task="broken", outcome="failure") - \
        value(after, "tunegrid_celery_tasks_total", task="broken", outcome="failure") == 1


def test_a_celery_worker_serves_its_metrics_on_its_own_port() -> None:
    """A Celery worker answers no HTTP of its own: `serve` starts Prometheus' server in it (real socket)."""
    import socket  # noqa: PLC0415

    import httpx  # noqa: PLC0415

    from coordinator.metrics import CELERY_TASKS, serve  # noqa: PLC0415

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    CELERY_TASKS.labels("probe_task", "success").inc()
    serve(port)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'tunegrid_celery_tasks_total{outcome="success",task="probe_task"}' in text

"""Background tasks: each idempotent and safe to repeat; the Celery app knows them and schedules them."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from coordinator import tasks
from coordinator.db.tables import JobModel, JobStatus, LeaseModel, WorkerModel, WorkerState, utcnow
from coordinator.settings import CoordinatorSettings
from tests.fakes import FakeAgent


def test_run_periodic_reaps_places_and_scores(client: TestClient, session: Session, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
                                              make_caller, create_job) -> None:
    provider = make_caller("provider", "pat")
    lost, spare = (FakeAgent.register(client, provider.key, machine_id=m) for m in ("lost", "spare"))
    job = create_job().json()
    a = lost.claim(wait_s=2)
    assert a is not None
    session.execute(update(LeaseModel).values(last_renewed_at=utcnow() - timedelta(seconds=settings.lease_grace_s + 5)))
    session.commit()
    assert spare.claim() is None  # idle and long-polling
    effects = tasks.run_periodic(session_factory=client.app.state.sessionmaker,  # type: ignore[attr-defined]
                                 settings=settings)
    session.expire_all()
    assert session.get(LeaseModel, a["lease_id"]).status.value == "lost"  # type: ignore[union-attr]
    placed = session.get(JobModel, job["id"])
    assert placed is not None and placed.status is JobStatus.running and placed.fencing_token == 2
    assert effects.wake == {spare.worker_id} and lost.worker_id in effects.recheck
    again = tasks.run_periodic(session_factory=client.app.state.sessionmaker,  # type: ignore[attr-defined]
                               settings=settings)
    assert not again.wake  # idempotent: nothing left to do


def test_scores_follow_the_counters_and_failed_checks_suspend(session: Session, settings: CoordinatorSettings,  # type: ignore[no-untyped-def]
                                                              client: TestClient, make_caller) -> None:
    provider = make_caller("provider", "pat")
    good, cheat, silent, orphan = (FakeAgent.register(client, provider.key, machine_id=m)
                                   for m in ("good", "cheat", "silent", "orphan"))
    session.execute(update(WorkerModel).where(WorkerModel.id == orphan.worker_id).values(state=WorkerState.working))
    session.execute(update(WorkerModel).where(WorkerModel.id == good.worker_id).values(completed_leases=20))
    session.execute(update(WorkerModel).where(WorkerModel.id == cheat.worker_id)
                    .values(failed_checks=settings.suspend_after_failed_checks))
    session.execute(update(WorkerModel).where(WorkerModel.id == silent.worker_id).values(
        state=WorkerState.idle, last_heartbeat_at=utcnow() - timedelta(minutes=10), available_until=None))
    session.commit()
    assert tasks.update_worker_scores(session=session, settings=settings) >= 4
    session.expire_all()
    rows = {w: session.get(WorkerModel, w) for w in (good.worker_id, cheat.worker_id, silent.worker_id)}
    assert rows[good.worker_id].reliability > 0.95  # type: ignore[union-attr]
    assert rows[cheat.worker_id].suspended_at is not None and rows[cheat.worker_id].state is WorkerState.suspended  # type: ignore[union-attr]
    assert rows[silent.worker_id].state is WorkerState.offline  # type: ignore[union-attr]
    assert session.get(WorkerModel, orphan.worker_id).state is WorkerState.offline  # type: ignore[union-attr]  # working, no lease
    assert tasks.update_worker_scores(session=session, settings=settings) == 0  # nothing changes twice


def test_the_celery_app_registers_every_task_on_a_beat_schedule() -> None:
    app = tasks.make_celery(CoordinatorSettings(redis_url="redis://127.0.0.1:6379/15", sweep_interval_s=2))
    names = {f"tunegrid.{t.__name__}" for t, _ in tasks.PERIODIC}
    assert names <= set(app.tasks)
    scheduled = {entry["task"]: entry["schedule"] for entry in app.conf.beat_schedule.values()}
    assert set(scheduled) == names and scheduled["tunegrid.reap_leases"] == 2
    assert app.conf.broker_url == "redis://127.0.0.1:6379/15" and app.conf.task_acks_late


def test_in_embedded_mode_the_app_runs_the_periodic_tasks_itself(settings: CoordinatorSettings, session: Session,  # type: ignore[no-untyped-def]
                                                                make_caller, training_file: str, customer) -> None:
    import time  # noqa: PLC0415

    from coordinator.app import create_app  # noqa: PLC0415

    embedded = settings.model_copy(update={"periodic_tasks": None, "sweep_interval_s": 0.2})  # default: on without Redis
    assert embedded.runs_periodic_tasks
    app = create_app(embedded)
    with TestClient(app) as client:
        provider = make_caller("provider", "pat")
        agent = FakeAgent.register(client, provider.key)
        job = client.post("/v1/fine_tuning/jobs", headers=customer.headers,
                          json={"model": "tunegrid/tiny-llama", "training_file": training_file}).json()
        a = agent.claim(wait_s=2)
        assert a is not None
        session.execute(update(LeaseModel).values(last_renewed_at=utcnow() - timedelta(seconds=settings.lease_grace_s + 5)))
        session.commit()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the app's own reaper notices, with no call from the test
            if client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=customer.headers).json()["status"] == "queued":
                break
            time.sleep(0.1)
        assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=customer.headers).json()["status"] == "queued"
    app.state.engine.dispose()

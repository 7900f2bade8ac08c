"""Job status changes: only allowed moves, each writing its event, through one function."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, FileModel, FileStatus, JobModel, JobStatus, Role
from coordinator.services.job_states import TERMINAL, TRANSITIONS, change_status
from shared.errors import Conflict

ROOT = Path(__file__).resolve().parents[3]


def _job(session: Session, status: JobStatus) -> JobModel:
    account = AccountModel(id=f"acct-{status.value}", name="a", role=Role.customer)
    file = FileModel(id=f"file-{status.value}", account_id=account.id, filename="t.jsonl", purpose="fine-tune",
                     bytes=1, sha256="0" * 64, status=FileStatus.processed)
    job = JobModel(id=f"ftjob-{status.value}", account_id=account.id, model="tunegrid/tiny-llama",
                   training_file_id=file.id, status=status, hyperparameters={}, lora={}, seed=1,
                   estimated_tokens=0, result_files=[])
    session.add_all([account, file, job])
    session.flush()
    return job


@pytest.mark.parametrize("source,target", list(itertools.product(JobStatus, JobStatus)))
def test_transition_table_is_enforced_and_every_change_writes_an_event(
    session: Session, source: JobStatus, target: JobStatus,
) -> None:
    job = _job(session, source)
    if target in TRANSITIONS[source]:
        event = change_status(session=session, job=job, to=target, message="moved")
        session.commit()
        assert job.status is target and event.job_id == job.id and event.data == {"status": target.value}
        assert (job.finished_at is not None) == (target in TERMINAL)
        if target is JobStatus.failed:
            assert job.error is not None and event.level == "error"
    else:
        with pytest.raises(Conflict):
            change_status(session=session, job=job, to=target, message="moved")
        assert job.status is source


def test_nothing_else_writes_job_status() -> None:
    writers = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "coordinator").rglob("*.py")
        if re.search(r"\bjob\.status\s*=[^=]", path.read_text())
    ]
    assert writers == ["coordinator/services/job_states.py"]


def test_a_concurrent_status_change_cannot_be_overwritten(session: Session, settings) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy.orm.exc import StaleDataError

    from coordinator.db.engine import make_engine, make_sessionmaker

    job = _job(session, JobStatus.queued)
    session.commit()
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as other:
        stale = other.get(JobModel, job.id)  # read while queued
        change_status(session=session, job=job, to=JobStatus.cancelled, message="cancelled")
        session.commit()
        change_status(session=other, job=stale, to=JobStatus.paused, message="paused")
        with pytest.raises(StaleDataError):
            other.commit()
    engine.dispose()
    session.refresh(job)
    assert job.status is JobStatus.cancelled


def test_a_batch_move_writes_every_event_and_fails_whole_if_any_job_changed(session: Session, settings) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import select  # noqa: PLC0415
    from sqlalchemy.orm.exc import StaleDataError  # noqa: PLC0415

    from coordinator.db.engine import make_engine, make_sessionmaker  # noqa: PLC0415
    from coordinator.db.tables import JobEventModel  # noqa: PLC0415
    from coordinator.services.job_states import Move, change_status_many  # noqa: PLC0415

    job = _job(session, JobStatus.queued)
    session.commit()
    change_status_many(session=session, moves=[Move(job=job, message="placed", data={"lease_id": "l1"},
                                                    values={"fencing_token": 1})],
                       frm=JobStatus.queued, to=JobStatus.running)
    session.commit()
    session.expire_all()
    assert (job.status, job.fencing_token, job.version) == (JobStatus.running, 1, 2)
    events = session.scalars(select(JobEventModel).where(JobEventModel.job_id == job.id)).all()
    assert [e.data for e in events] == [{"status": "running", "lease_id": "l1"}]

    engine = make_engine(settings)
    with make_sessionmaker(engine)() as other:
        stale = other.get(JobModel, job.id)  # read while running, version 2
        change_status(session=session, job=job, to=JobStatus.paused, message="paused")
        session.commit()
        with pytest.raises(StaleDataError):
            change_status_many(session=other, moves=[Move(job=stale, message="x", data={}, values={})],  # type: ignore[arg-type]
                               frm=JobStatus.running, to=JobStatus.paused)
    engine.dispose()
    with pytest.raises(ValueError):
        change_status_many(session=session, moves=[Move(job=job, message="x", data={}, values={})],
                           frm=JobStatus.paused, to=JobStatus.cancelled)

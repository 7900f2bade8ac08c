"""`services/integrations.py` on a real database, with the real W&B SDK in its offline mode (nothing leaves this
machine): a job's metrics reach a run named by the job, each step once, the run finishes with the job, the
customer's key is never in a response or an assignment, and a failing W&B is an event, bounded, never a lost job."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.api.jobs import job_read
from coordinator.db.tables import JobEventModel, JobModel, JobStatus
from coordinator.services import integrations
from coordinator.settings import CoordinatorSettings
from shared.errors import InvalidRequest
from tests.fakes import ServiceAgent
from tests.wandb_offline import runs

KEY = "wandb-key-" + "x" * 30
WANDB = {"type": "wandb", "wandb": {"project": "sums", "name": "first try", "tags": ["exp"], "api_key": KEY}}


def _offline(settings: CoordinatorSettings) -> CoordinatorSettings:
    return settings.model_copy(update={"wandb_mode": "offline"})


def test_metrics_are_forwarded_once_and_the_run_finishes_with_the_job(
    session: Session, settings: CoordinatorSettings, service_agent: Callable[..., ServiceAgent],
    new_job: Callable[..., JobModel],
) -> None:
    job = new_job(integrations=[WANDB])
    assert job_read(job).integrations == [{"type": "wandb", "wandb": {"project": "sums", "name": "first try",
                                                                        "tags": ["exp"]}}]
    agent = service_agent()
    a = agent.claim()
    assert a is not None and KEY not in a.model_dump_json()  # the provider never sees the key
    agent.progress(a.lease_id, step=1, loss=2.5)
    agent.progress(a.lease_id, step=2, loss=2.0)
    offline = _offline(settings)
    assert integrations.forward(session=session, settings=offline) == 2
    assert integrations.forward(session=session, settings=offline) == 0  # nothing new: nothing logged, no run
    agent.progress(a.lease_id, step=2, loss=1.9)  # a step again (a resumed lease): not logged twice
    agent.progress(a.lease_id, step=3, loss=1.5, eval_loss=1.7)
    agent.finish(a.lease_id)
    assert session.get(JobModel, job.id, populate_existing=True).status is JobStatus.succeeded  # type: ignore[union-attr]
    assert integrations.forward(session=session, settings=offline) >= 1
    found = runs(Path(settings.data_dir) / "wandb")
    assert {r["id"] for r in found} == {job.id} and all(r["project"] == "sums" for r in found)
    assert found[0]["name"] == "first try" and {"tunegrid", f"tunegrid/{job.id}", "exp"} <= set(found[0]["tags"])
    history = [(h["_step"], h.get("train_loss"), h.get("valid_loss")) for r in found for h in r["history"]]
    assert [h[:2] for h in history] == [(1, 2.5), (2, 2.0), (3, 1.5)], history  # finish() re-reports step 1
    assert history[2] == (3, 1.5, 1.7)
    assert found[-1]["exit_code"] == 0 and found[-1]["summary"]["status"] == "succeeded"
    messages = [e.message for e in session.scalars(select(JobEventModel).where(JobEventModel.job_id == job.id))]
    assert any("forwarded to Weights & Biases project 'sums'" in m for m in messages)
    assert integrations.forward(session=session, settings=offline) == 0  # finished: never again


def test_a_wandb_integration_needs_the_customers_key(new_job: Callable[..., JobModel]) -> None:
    with pytest.raises(InvalidRequest) as refused:
        new_job(integrations=[{"type": "wandb", "wandb": {"project": "p"}}])
    assert refused.value.code == "wandb_api_key_required"


def test_a_failing_wandb_is_an_event_and_is_given_up_after_three_tries(
    session: Session, settings: CoordinatorSettings, service_agent: Callable[..., ServiceAgent],
    new_job: Callable[..., JobModel], monkeypatch: pytest.MonkeyPatch,
) -> None:
    job = new_job(integrations=[WANDB])
    agent = service_agent()
    a = agent.claim()
    assert a is not None
    agent.progress(a.lease_id, step=1)

    def unreachable(*_: object, **__: object) -> None:  # W&B's servers, as this machine sees them (mocked)
        raise ConnectionError(f"api.wandb.ai unreachable with key {KEY}")

    monkeypatch.setattr(integrations, "_log_to_wandb", unreachable)
    for _ in range(integrations.MAX_FAILURES + 1):
        integrations.forward(session=session, settings=settings)
    warnings = [e.message for e in session.scalars(select(JobEventModel).where(
        JobEventModel.job_id == job.id, JobEventModel.level == "warn"))]
    assert len(warnings) == integrations.MAX_FAILURES and warnings[-1].startswith(
        "Forwarding metrics to Weights & Biases failed (giving up)")
    assert all(KEY not in w and "ConnectionError" in w for w in warnings)  # an error quoting the key: not shown
    assert session.get(JobModel, job.id).status is JobStatus.running  # type: ignore[union-attr]

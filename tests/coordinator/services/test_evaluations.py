"""`services/evaluations.py` on a real database: a job that asks for an evaluation gets two batches when it
succeeds (its validation prompts through the base and through the fine-tune, greedy), held by the budgets
sweep and run like any batch; the job's page shows the two answers beside the reference."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, JobModel, JobStatus
from coordinator.services import budgets, evaluations, files, reports
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from shared.errors import InvalidRequest
from tests.conftest import chat_lines, jsonl
from tests.coordinator.services.test_batches import KINDS
from tests.coordinator.services.test_exports import succeeded
from tests.fakes import ServiceAgent, batch_answer

NewJob = Callable[..., JobModel]


def _validation(session: Session, store: BlobStore, settings: CoordinatorSettings, account: AccountModel) -> str:
    tools = {"messages": [{"role": "user", "content": "weather?"},
                          {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                           "function": {"name": "get_weather", "arguments": "{}"}}]}],
             "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]}
    lines = [json.dumps(tools), *chat_lines(12)]
    return files.upload(session=session, store=store, account=account, filename="valid.jsonl", purpose="fine-tune",
                        source=io.BytesIO(jsonl(lines)), max_bytes=settings.max_upload_bytes,
                        min_examples=settings.min_training_examples, retention=timedelta(days=1)).id


def test_a_succeeded_job_is_evaluated_by_two_batches_shown_side_by_side(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent], new_job: NewJob,
) -> None:
    agent = service_agent()
    validation = _validation(session, store, settings, customer_account)
    job = succeeded(session, agent, new_job, validation_file=validation, evaluation={"examples": 3})
    state = job.evaluation or {}
    base, tuned = session.get(JobModel, state["base_batch_id"]), session.get(JobModel, state["tuned_batch_id"])
    assert base is not None and tuned is not None
    assert (base.model, base.initial_adapter, tuned.initial_model) == ("tunegrid/tiny-llama", None, job.fine_tuned_model)
    assert tuned.initial_adapter["member"] == "adapter/adapter_model.safetensors"  # type: ignore[index]
    refs = state["references"]
    assert [r["custom_id"] for r in refs] == ["eval-0", "eval-1", "eval-2"]  # the tool example is left out
    first = json.loads(jsonl(chat_lines(12)).splitlines()[0])["messages"]
    assert refs[0]["prompt"] == first[-2]["content"] and refs[0]["reference"] == first[-1]["content"]
    assert base.held_micros == 0 and budgets.enforce_budgets(session=session, settings=settings)["reheld"] == 2
    for answer in ("base says", "tuned says"):
        a = agent.claim(kinds=KINDS)
        assert a is not None and a.kind == "batch"
        agent.events(a.lease_id, {"type": "started", "total_steps": 3, "message": "Batch started on cpu"})
        agent.upload_batch_part(a.lease_id, [batch_answer(f"eval-{i}", f"{answer} {i}") for i in range(3)])
        agent.complete_batch(a.lease_id)
    session.expire_all()
    assert session.get(JobModel, base.id).status is JobStatus.succeeded  # type: ignore[union-attr]
    rows = evaluations.side_by_side(session, session.get(JobModel, job.id))  # type: ignore[arg-type]
    assert [(r["base"], r["tuned"]) for r in rows] == [(f"base says {i}", f"tuned says {i}") for i in range(3)]
    detail = reports.job_detail(session=session, job_id=job.id, account_id=customer_account.id)
    assert detail.evaluation == rows


def test_an_evaluation_needs_a_validation_file(new_job: NewJob) -> None:
    with pytest.raises(InvalidRequest) as refused:
        new_job(evaluation={"examples": 3})
    assert refused.value.code == "evaluation_needs_validation"

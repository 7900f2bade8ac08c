"""`services/batch_leases.py` on a real database: each request is answered once (the first part that brings it
wins, a later one is a duplicate), a lost lease's successor is told what was answered, a lying part is refused
whole, a lease that stops with requests unanswered fails against its worker and is billed only until its last
answer, and the batch completes with OpenAI's output and error files."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from sqlalchemy.orm import Session

from coordinator.db.tables import (
    AccountModel, BatchRequestModel, FileModel, JobModel, JobStatus, LeaseModel, LeaseStatus, UsageRecordModel,
)
from coordinator.services import files, leases
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from shared.errors import Conflict, InvalidRequest
from tests.coordinator.services.test_batches import KINDS, new_batch
from tests.fakes import ServiceAgent, batch_answer, batch_lines


def _claimed(agent: ServiceAgent) -> str:
    a = agent.claim(kinds=KINDS)
    assert a is not None and a.kind == "batch"
    agent.events(a.lease_id, {"type": "started", "total_steps": 1, "message": "Batch started on cpu"})
    return a.lease_id


def _done_list(session: Session, store: BlobStore, agent: ServiceAgent, lease_id: str) -> list[str]:
    a = agent.assignments[lease_id]
    found = leases.lease_input(session=session, worker=agent.worker, lease_id=lease_id,
                               fencing_token=a.fencing_token, which="batch_done")
    assert found.sha256 == a.batch_done_sha256
    return [json.loads(x)["custom_id"] for x in store.path(found.key).read_text().splitlines()]


def test_each_request_is_answered_once_across_leases_and_the_batch_completes_in_openais_format(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent], new_provider,  # type: ignore[no-untyped-def]
) -> None:
    first, second = service_agent(), service_agent("pc-2", provider=new_provider("quinn"))
    batch = new_batch(session, store, settings, customer_account, batch_lines(4, max_tokens=8))
    lease = _claimed(first)
    assert _done_list(session, store, first, lease) == []
    assert first.upload_batch_part(lease, [batch_answer("req-0", "zero"), batch_answer("req-1", "one")]) == {
        "recorded": 2, "duplicates": 0, "pending": 2}
    first.preempted(lease)
    later = _claimed(second)
    assert _done_list(session, store, second, later) == ["req-0", "req-1"]
    counts = second.upload_batch_part(later, [
        batch_answer("req-1", "ONE"), batch_answer("req-3", "three", finish_reason="length", completion_tokens=8)])
    assert counts == {"recorded": 1, "duplicates": 1, "pending": 1}  # req-1 was the first lease's
    second.upload_batch_part(later, [batch_answer("req-2", "two")])
    second.complete_batch(later)
    session.expire_all()
    done = session.get(JobModel, batch.id)
    assert done is not None and done.status is JobStatus.succeeded
    output = session.get(FileModel, done.batch["output_file_id"])  # type: ignore[index]
    lines = [json.loads(x) for x in store.path(files.blob_key(output.id)).read_text().splitlines()]  # type: ignore[union-attr]
    assert [x["custom_id"] for x in lines] == ["req-0", "req-1", "req-2", "req-3"]  # in input order, once each
    assert [x["response"]["body"]["choices"][0]["message"]["content"] for x in lines] == ["zero", "one", "two", "three"]
    assert lines[3]["response"]["body"]["choices"][0]["finish_reason"] == "length"
    assert all(x["id"].startswith("batch_req_") and x["response"]["request_id"] == x["id"] for x in lines)
    assert done.batch["usage"] == {"input_tokens": 80, "output_tokens": 14}  # type: ignore[index]
    # The first lease is billed until its last answer; the second until its end.
    rules = {r.lease_id: r.rule for r in session.query(UsageRecordModel).filter_by(job_id=batch.id)}
    assert rules == {lease: "until_checkpoint", later: "until_end"}


def test_a_lying_part_is_refused_whole(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent],
) -> None:
    settings.suspend_after_failed_checks = 100  # each lie counts; the suspension they lead to: the next test
    agent = service_agent()
    new_batch(session, store, settings, customer_account, batch_lines(2, max_tokens=8))
    lease = _claimed(agent)
    lies = {
        "unknown custom_id": [batch_answer("req-9")],
        "more tokens than allowed": [batch_answer("req-0", completion_tokens=9)],
        "more text than its tokens": [batch_answer("req-0", "x" * 1000, completion_tokens=2)],
        "a context too long for a short prompt": [{"custom_id": "req-0", "error": {
            "code": "context_length_exceeded", "message": "sure"}}],
        "an error of its own": [{"custom_id": "req-0", "error": {"code": "busy", "message": "later"}}],
        "a NUL": [batch_answer("req-0", "a\x00b")],
        "a lone surrogate": [batch_answer("req-0", "\ud800")],
        "a field too many": [{**batch_answer("req-0"), "logprobs": []}],
        "a negative count": [batch_answer("req-0", completion_tokens=-1)],
    }
    for why, part in lies.items():
        with pytest.raises(InvalidRequest) as refused:
            agent.upload_batch_part(lease, [batch_answer("req-1"), *part])
        assert refused.value.code in ("batch_result_invalid", "batch_result_rejected"), why
        session.rollback()
    assert session.query(BatchRequestModel).filter_by(status="pending").count() == 2  # nothing of any was kept
    assert not list(store.root.glob(f"batches/{lease}/part-*"))
    assert agent.worker.failed_checks == len(lies)  # a lie costs its worker


def test_a_worker_that_keeps_lying_is_suspended_and_loses_the_batch(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent],
) -> None:
    from shared.errors import LeaseLost  # noqa: PLC0415

    agent = service_agent()
    batch = new_batch(session, store, settings, customer_account, batch_lines(2))
    lease = _claimed(agent)
    for _ in range(settings.suspend_after_failed_checks):
        with pytest.raises(InvalidRequest):
            agent.upload_batch_part(lease, [batch_answer("req-9")])
    assert agent.worker.suspended_at is not None
    with pytest.raises(LeaseLost):
        agent.upload_batch_part(lease, [batch_answer("req-0")])
    session.expire_all()
    assert session.get(JobModel, batch.id).status is JobStatus.queued  # type: ignore[union-attr]  # for another worker


def test_a_lease_that_stops_with_requests_unanswered_fails_and_the_rest_goes_on(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent],
) -> None:
    agent = service_agent()
    batch = new_batch(session, store, settings, customer_account, batch_lines(3))
    lease = _claimed(agent)
    agent.upload_batch_part(lease, [batch_answer("req-0")])
    agent.complete_batch(lease)
    session.expire_all()
    assert session.get(LeaseModel, lease).status is LeaseStatus.failed  # type: ignore[union-attr]
    again = session.get(JobModel, batch.id)
    assert again is not None and again.status is JobStatus.queued and again.attempts == 1


def test_only_a_batch_lease_reports_answers(
    session: Session, service_agent: Callable[..., ServiceAgent], new_job,  # type: ignore[no-untyped-def]
) -> None:
    agent = service_agent()
    new_job()
    a = agent.claim(kinds=KINDS)
    assert a is not None and a.kind == "train"
    with pytest.raises(Conflict) as wrong:
        agent.upload_batch_part(a.lease_id, [batch_answer("req-0")])
    assert wrong.value.code == "wrong_lease_kind"


def test_a_prompt_too_long_for_the_model_goes_to_the_error_file(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent],
) -> None:
    agent = service_agent()
    long = json.dumps({"custom_id": "long", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "tunegrid/tiny-llama", "messages": [{"role": "user", "content": "word " * 200}]}}).encode() + b"\n"
    batch = new_batch(session, store, settings, customer_account, batch_lines(1) + long)
    lease = _claimed(agent)
    agent.upload_batch_part(lease, [batch_answer("req-0"), {"custom_id": "long", "error": {
        "code": "context_length_exceeded", "message": "the prompt's 600 tokens exceed the model's 512"}}])
    agent.complete_batch(lease)
    session.expire_all()
    done = session.get(JobModel, batch.id)
    assert done is not None and done.status is JobStatus.succeeded and done.batch["counts"] == {  # type: ignore[index]
        "total": 2, "completed": 1, "failed": 1}
    errors = session.get(FileModel, done.batch["error_file_id"])  # type: ignore[index]
    [line] = [json.loads(x) for x in store.path(files.blob_key(errors.id)).read_text().splitlines()]  # type: ignore[union-attr]
    assert line["custom_id"] == "long" and line["response"]["status_code"] == 400
    assert line["response"]["body"]["error"]["code"] == "context_length_exceeded"

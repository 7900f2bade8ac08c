"""Hostile workers and customers against the Batch API and evaluations (`services/batches.py`, `batch_rows.py`,
`batch_leases.py`, `evaluations.py`), on a real database. Each test asserts the safe behaviour."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from coordinator.db.tables import (
    AccountModel,
    FileModel,
    JobModel,
    JobStatus,
    LeaseModel,
)
from coordinator.services import batch_rows, budgets, files
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore, DiskStore
from shared.errors import InvalidFile, InvalidRequest
from tests.conftest import jsonl
from tests.coordinator.api.test_openai_schemas import _valid, validator_for  # noqa: F401 - the fixture
from tests.coordinator.services.test_batches import KINDS, new_batch
from tests.coordinator.services.test_exports import succeeded
from tests.fakes import ServiceAgent, batch_answer, batch_lines

NewJob = Callable[..., JobModel]


def _claimed(agent: ServiceAgent) -> str:
    a = agent.claim(kinds=KINDS)
    assert a is not None and a.kind == "batch"
    agent.events(a.lease_id, {"type": "started", "total_steps": 1, "message": "Batch started"})
    return a.lease_id


def _output(session: Session, store: BlobStore, batch: JobModel) -> list[dict]:  # type: ignore[type-arg]
    file_id = (batch.batch or {}).get("output_file_id")
    if not file_id:
        return []
    return [json.loads(x) for x in store.path(files.blob_key(file_id)).read_text().splitlines()]


def _worked_for(session: Session, lease_id: str, *, minutes: int) -> None:
    """The lease started `minutes` ago, on the coordinator's clock (the time it bills from)."""
    from coordinator.db.tables import utcnow

    lease = session.get(LeaseModel, lease_id)
    assert lease is not None
    lease.training_started_at = utcnow() - timedelta(minutes=minutes)
    session.commit()


# --- the honest batch program's answers are refused ----------------------------------------------------------

def test_an_honest_context_length_answer_is_not_refused_on_a_model_whose_lease_context_is_shorter(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent],
) -> None:
    """The batch program (worker/trainer/generate.py) answers `context_length_exceeded` when the prompt and
    max_tokens pass `spec.max_seq_len`, the lease's context (placement.seq_len_for: at most 2048); the coordinator
    checks the claim against the base model's own max_seq_len (32768 for Qwen2.5). The honest part is refused whole,
    and every other answer in it with it."""
    agent = service_agent()
    model = "qwen2.5-0.5b-instruct"
    batch = new_batch(session, store, settings, customer_account, batch_lines(2, model=model, max_tokens=4096))
    a = agent.claim(kinds=KINDS)
    assert a is not None and a.kind == "batch" and a.job_id == batch.id
    agent.events(a.lease_id, {"type": "started", "total_steps": 2, "message": "Batch started"})
    limit = a.spec.max_seq_len
    assert limit < 4096  # what generate.py compares the prompt and max_tokens with
    honest = [{"custom_id": f"req-{i}", "error": {
        "code": "context_length_exceeded",
        "message": f"the prompt's 20 tokens and max_tokens 4096 exceed the model's {limit}"}} for i in range(2)]
    counts = agent.upload_batch_part(a.lease_id, honest)
    assert counts["recorded"] == 2


def test_an_honest_context_length_answer_is_not_refused_for_a_prompt_of_many_short_messages(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent],
) -> None:
    """The coordinator bounds a prompt's tokens by its content bytes plus a flat `TEMPLATE_TOKENS` (256); a chat
    template adds tokens per message (role, turn markers), so 100 one-letter messages are 615 tokens on the tiny
    model (context 512) for 100 bytes of content. The batch program truthfully answers context_length_exceeded,
    and the coordinator refuses the part whole, as a lie."""
    from worker.trainer.tiny import build_tokenizer

    messages = [{"role": "user", "content": "a"}] * 100
    ids = build_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    agent = service_agent()
    batch = new_batch(session, store, settings, customer_account, batch_lines(1, messages=messages))
    a = agent.claim(kinds=KINDS)
    assert a is not None and a.job_id == batch.id
    assert len(ids) + 16 > a.spec.max_seq_len  # what generate.py checks: the claim is true
    agent.events(a.lease_id, {"type": "started", "total_steps": 1, "message": "Batch started"})
    counts = agent.upload_batch_part(a.lease_id, [{"custom_id": "req-0", "error": {
        "code": "context_length_exceeded",
        "message": f"the prompt's {len(ids)} tokens and max_tokens 16 exceed the model's {a.spec.max_seq_len}"}}])
    assert counts["recorded"] == 1


# --- a customer's validation file breaks the fine-tune's completion ---------------------------------------------

def test_an_evaluation_prompt_that_ends_with_an_assistant_turn_does_not_block_the_job_from_succeeding(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent], new_job: NewJob,
) -> None:
    """A chat example may hold two assistant turns in a row (training validates it); the evaluation's prompt is
    the conversation up to the last assistant turn, which then ends with an assistant turn, which a batch line
    refuses: `evaluations.queue_asked` raises inside the training lease's completion, so the job never
    succeeds and the worker's completion is answered 400 however often it retries."""
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Count to {i}."},
                                      {"role": "assistant", "content": "Sure."},
                                      {"role": "assistant", "content": " ".join(str(n) for n in range(i + 1))}]})
             for i in range(12)]
    validation = files.upload(session=session, store=store, account=customer_account, filename="valid.jsonl",
                              purpose="fine-tune", source=io.BytesIO(jsonl(lines)),
                              max_bytes=settings.max_upload_bytes, min_examples=settings.min_training_examples,
                              retention=timedelta(days=1)).id
    agent = service_agent()
    job = new_job(validation_file=validation, evaluation={"examples": 3})
    a = agent.claim()
    assert a is not None and a.job_id == job.id
    try:
        agent.finish(a.lease_id)
    except InvalidFile as exc:
        session.rollback()
        pytest.fail(f"the training lease's completion was refused: {exc.message}")
    done = session.get(JobModel, job.id, populate_existing=True)
    assert done is not None and done.status is JobStatus.succeeded


def test_an_evaluation_prompt_past_the_line_limit_once_escaped_does_not_block_the_job_from_succeeding(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent], new_job: NewJob,
) -> None:
    """`evaluations._file` writes the prompts with json.dumps' default ensure_ascii: a non-ASCII validation prompt
    of 3 MiB (a line the validation file may hold) becomes a batch line of 9 MiB, past `files.MAX_LINE_BYTES`,
    and the training lease's completion raises InvalidFile."""
    big = "\u00e9" * (1536 * 1024)  # 3 MiB of UTF-8, 9 MiB as \\u00e9 escapes
    lines = [json.dumps({"messages": [{"role": "user", "content": big if i == 0 else f"What is {i} + {i}?"},
                                      {"role": "assistant", "content": str(2 * i)}]}, ensure_ascii=False)
             for i in range(12)]
    validation = files.upload(session=session, store=store, account=customer_account, filename="valid.jsonl",
                              purpose="fine-tune", source=io.BytesIO(jsonl(lines)), max_bytes=16 * 1024 * 1024,
                              min_examples=settings.min_training_examples, retention=timedelta(days=1)).id
    agent = service_agent()
    job = new_job(validation_file=validation, evaluation={"examples": 3})
    a = agent.claim()
    assert a is not None and a.job_id == job.id
    try:
        agent.finish(a.lease_id)
    except InvalidFile as exc:
        session.rollback()
        pytest.fail(f"the training lease's completion was refused: {exc.message}")
    done = session.get(JobModel, job.id, populate_existing=True)
    assert done is not None and done.status is JobStatus.succeeded


# --- money -----------------------------------------------------------------------------------------------------

def test_a_running_batch_is_swept_by_the_budgets_like_an_export(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch lease's first report starts no accrual (`leases._start_training` accrues train and export leases
    only), so `budgets.enforce_budgets` never looks at a running batch: its hold is never extended and it never
    ends for the balance (`budgets._end_for_balance`); the lease's charge comes out of the available balance at
    its end, however far past the hold and the balance."""
    agent = service_agent()
    batch = new_batch(session, store, settings, customer_account, batch_lines(2))
    lease = _claimed(agent)
    agent.upload_batch_part(lease, [batch_answer("req-0")])
    later = budgets.utcnow() + timedelta(days=60)  # 1440 GPU-hours: far past the $100 the customer has
    monkeypatch.setattr(budgets, "utcnow", lambda: later)
    counts = budgets.enforce_budgets(session=session, settings=settings)
    session.expire_all()
    swept = session.get(JobModel, batch.id)
    assert swept is not None
    assert counts["failed"] == 1 and swept.status is JobStatus.failed, (counts, swept.status)
    assert [x["custom_id"] for x in _output(session, store, swept)] == ["req-0"]


def test_a_batch_that_fails_after_its_attempts_still_gives_the_answers_it_was_billed_for(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent], new_provider,  # type: ignore[no-untyped-def]
) -> None:
    """Workers that each stop with requests unanswered use the batch's attempts; at `max_attempts` the batch
    fails (`lease_states._requeue_or_fail`) without `batches.finalize`: the answer the customer was billed for
    is in no output file, and the batch shows no output_file_id."""
    batch = new_batch(session, store, settings, customer_account, batch_lines(2))
    for attempt in range(settings.max_attempts):
        agent = service_agent(f"pc-{attempt}", provider=new_provider(f"p{attempt}"))
        budgets.enforce_budgets(session=session, settings=settings)  # a lease's charge may have used the hold up
        lease = _claimed(agent)
        if attempt == 0:
            _worked_for(session, lease, minutes=10)
            agent.upload_batch_part(lease, [batch_answer("req-0", "zero")])
        agent.complete_batch(lease)
    session.expire_all()
    failed = session.get(JobModel, batch.id)
    assert failed is not None and failed.status is JobStatus.failed
    assert failed.billed_micros > 0  # the first lease, until its answer
    assert failed.batch["output_file_id"] is not None  # type: ignore[index]
    assert [x["custom_id"] for x in _output(session, store, failed)] == ["req-0"]


def test_a_batch_that_cannot_hold_again_after_a_lease_still_gives_the_answers_it_was_billed_for(
    session: Session, store: BlobStore, settings: CoordinatorSettings, make_caller,  # type: ignore[no-untyped-def]
    service_agent: Callable[..., ServiceAgent],
) -> None:
    """A preempted lease's charge uses up the batch's hold; back in the queue, the budgets sweep cannot hold
    again for a customer with nothing left, and fails the batch (`budgets._rehold`) without `batches.finalize`:
    the answer just billed is in no output file."""
    caller = make_caller("customer", "carl", credit="0.05")
    account = session.get(AccountModel, caller.account_id)
    assert account is not None
    batch = new_batch(session, store, settings, account, batch_lines(2))
    assert 0 < batch.held_micros <= 50_000
    agent = service_agent()
    lease = _claimed(agent)
    _worked_for(session, lease, minutes=60)  # at $0.30/GPU-hour and more: past the hold and the balance
    agent.upload_batch_part(lease, [batch_answer("req-0", "zero")])
    agent.preempted(lease)
    session.expire_all()
    queued = session.get(JobModel, batch.id)
    assert queued is not None and queued.status is JobStatus.queued and queued.held_micros <= 0
    assert budgets.enforce_budgets(session=session, settings=settings)["failed"] == 1
    session.expire_all()
    failed = session.get(JobModel, batch.id)
    assert failed is not None and failed.status is JobStatus.failed and failed.billed_micros > 0
    assert [x["custom_id"] for x in _output(session, store, failed)] == ["req-0"]


# --- lies the coordinator could see ---------------------------------------------------------------------------

def test_a_prompt_token_count_the_prompt_cannot_have_is_refused(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent],
) -> None:
    """A prompt of 17 bytes is at most 17 tokens plus what the chat template adds (`TEMPLATE_TOKENS`, the bound
    the coordinator itself uses for context claims); a worker's answer that says 500 is a lie that becomes the
    batch's `usage.input_tokens` and the output line's `usage.prompt_tokens`."""
    agent = service_agent()
    new_batch(session, store, settings, customer_account, batch_lines(1))
    lease = _claimed(agent)
    with pytest.raises(InvalidRequest) as refused:
        agent.upload_batch_part(lease, [batch_answer("req-0", prompt_tokens=500)])
    assert refused.value.code in ("batch_result_invalid", "batch_result_rejected")



# --- a hostile customer's batch file ---------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["temperature", "top_p"])
def test_a_sampling_number_too_large_for_a_float_is_a_400_not_a_500(
    client, customer, key: str,  # type: ignore[no-untyped-def]
) -> None:
    """`shared.batches._number` calls math.isfinite on any int: one of 400 digits raises OverflowError, which
    the upload answers 500."""
    line = (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": '
            b'"tunegrid/tiny-llama", "messages": [{"role": "user", "content": "hi"}], "' + key.encode() + b'": '
            + b"1" * 400 + b"}}\n")
    response = client.post("/v1/files", headers=customer.headers, data={"purpose": "batch"},
                           files={"file": ("batch.jsonl", line)})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_file"


# --- a hostile worker's answers against the coordinator's memory ------------------------------------------------

def test_finalizing_a_batch_does_not_hold_its_whole_output_in_memory(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
) -> None:
    """`batches.finalize` writes the output file into an io.BytesIO (and copies it once more with getvalue()):
    memory grows with the whole output, which answers make as large as 50,000 requests x 64 bytes x 8192 tokens
    (25 GiB) the checks let a worker send. Here 37 MB of answers must not take half of it at once."""
    import tracemalloc

    from sqlalchemy import update

    from coordinator.db.tables import BatchRequestModel
    from coordinator.services import batches
    from shared.schemas.batches import BatchCreate

    n, size = 8000, 4096
    file = files.upload(session=session, store=store, account=customer_account, filename="batch.jsonl",
                        purpose="batch", source=io.BytesIO(batch_lines(n, max_tokens=64)), max_bytes=10**8,
                        min_examples=1, retention=timedelta(days=1))
    batch = batches.create(session=session, store=store, account=customer_account, settings=settings,
                           request=BatchCreate.model_validate({"input_file_id": file.id, "completion_window": "24h",
                                                               "endpoint": "/v1/chat/completions"}))
    session.execute(update(BatchRequestModel).where(BatchRequestModel.job_id == batch.id).values(
        status="completed", content="x" * size, finish_reason="length", prompt_tokens=20,
        completion_tokens=64))  # 64 tokens of up to 64 bytes each: what `_check` lets through
    session.commit()
    session.expire_all()
    again = session.get(JobModel, batch.id)
    assert again is not None
    tracemalloc.start()
    try:
        batch_rows.finalize(session=session, store=store, batch=again)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    session.commit()
    output = session.get(FileModel, again.batch["output_file_id"])  # type: ignore[index]
    assert output is not None and output.bytes > n * size
    assert peak < output.bytes // 2, f"finalize held {peak / 1e6:.1f} MB for an output of {output.bytes / 1e6:.1f} MB"


# --- attacks already handled (guards for paths the batch tests do not cover) -----------------------------------

def test_a_batch_against_another_customers_real_fine_tune_or_checkpoint_is_model_not_found(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent], new_job: NewJob, make_caller,  # type: ignore[no-untyped-def]
) -> None:
    from coordinator.db.tables import JobCheckpointModel
    from tests.coordinator.services.test_jobs import other_customer_account

    alice = succeeded(session, service_agent(), new_job, checkpoint=True)
    checkpoint = session.query(JobCheckpointModel).filter_by(job_id=alice.id).one()
    bob = other_customer_account(session, make_caller)
    for name in (alice.fine_tuned_model, checkpoint.fine_tuned_model_checkpoint):
        with pytest.raises(InvalidRequest) as refused:
            new_batch(session, store, settings, bob, batch_lines(2, model=name))
        session.rollback()
        assert refused.value.code == "model_not_found"
    assert session.query(JobModel).filter_by(account_id=bob.id).count() == 0


def test_parts_from_an_ended_lease_or_another_workers_lease_record_nothing(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent], new_provider,  # type: ignore[no-untyped-def]
) -> None:
    from coordinator.db.tables import BatchRequestModel
    from shared.errors import LeaseLost, NotFound

    first, second = service_agent(), service_agent("pc-2", provider=new_provider("quinn"))
    batch = new_batch(session, store, settings, customer_account, batch_lines(3))
    old = _claimed(first)
    first.preempted(old)
    live = _claimed(second)
    with pytest.raises(LeaseLost):  # its own lease, ended: the successor's requests are not its to answer
        first.upload_batch_part(old, [batch_answer("req-0", "stale")])
    session.rollback()
    with pytest.raises(NotFound):  # the live lease, not its own
        first.upload_batch_part(live, [batch_answer("req-0", "stolen")], token=second.leases[live])
    session.rollback()
    with pytest.raises(LeaseLost):  # its own live lease with a stale token
        second.upload_batch_part(live, [batch_answer("req-0", "replayed")], token=second.leases[live] - 1)
    session.rollback()
    assert session.query(BatchRequestModel).filter_by(job_id=batch.id, status="pending").count() == 3
    assert not [p for p in store.root.glob("batches/*/part-*")]


def test_a_part_too_large_per_line_or_in_lines_is_refused_whole(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent],
) -> None:
    from coordinator.db.tables import BatchRequestModel
    from coordinator.services import batch_leases

    agent = service_agent()
    batch = new_batch(session, store, settings, customer_account, batch_lines(2))
    lease = _claimed(agent)
    fencing = agent.leases[lease]
    for data in (json.dumps(batch_answer("req-0", "x" * (5 * 1024 * 1024))).encode() + b"\n",
                 b"".join(json.dumps(batch_answer("req-0")).encode() + b"\n" for _ in range(10_001)),
                 b"[" * 100_000 + b"\n", b"\xff\xfe\n", json.dumps(batch_answer("req-0")).encode().replace(
                     b'"42"', b'"\\ud800"') + b"\n"):
        blob = store.put(batch_leases.part_key(lease), io.BytesIO(data))
        with pytest.raises((InvalidRequest, InvalidFile)):
            batch_leases.record_part(session=session, store=store, settings=settings, worker=agent.worker, lease_id=lease,
                                     fencing_token=fencing, blob=blob)
        session.rollback()
        assert not store.path(blob.key).exists()
    assert session.query(BatchRequestModel).filter_by(job_id=batch.id, status="pending").count() == 2


def test_another_customer_sees_no_batch_and_no_output_and_cannot_cancel(
    client, customer, make_caller, validator_for,  # type: ignore[no-untyped-def]  # noqa: F811
) -> None:
    """Over HTTP: the batch, its output file and its cancel are 404 to another customer; a cancelled and an
    expired batch still validate against OpenAI's Batch schema."""
    import hashlib

    from shared.protocol import SHA256_HEADER
    from tests.fakes import FakeAgent

    ids = []
    for _ in range(2):
        file = client.post("/v1/files", headers=customer.headers, data={"purpose": "batch"},
                           files={"file": ("batch.jsonl", batch_lines(3))}).json()
        ids.append(client.post("/v1/batches", headers=customer.headers, json={
            "input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}).json()["id"])
    agent = FakeAgent.register(client, make_caller("provider", "pat").key)
    a = agent.claim(kinds=KINDS)
    assert a is not None and a["job_id"] == ids[0]
    agent.events(a["lease_id"], {"type": "started", "total_steps": 3, "message": "Batch started"})
    part = (json.dumps(batch_answer("req-0")) + "\n").encode()
    headers = {**agent.headers(a["lease_id"]), SHA256_HEADER: hashlib.sha256(part).hexdigest()}
    assert client.put(f"/v1/workers/leases/{a['lease_id']}/batch_results", content=part,
                      headers=headers).status_code == 200
    bob = make_caller("customer", "bob")
    assert client.post(f"/v1/batches/{ids[0]}/cancel", headers=bob.headers).status_code == 404
    cancelled = client.post(f"/v1/batches/{ids[0]}/cancel", headers=customer.headers)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    _valid(validator_for, "Batch", cancelled.json())
    output = cancelled.json()["output_file_id"]
    assert client.get(f"/v1/batches/{ids[0]}", headers=bob.headers).status_code == 404
    assert client.get(f"/v1/files/{output}", headers=bob.headers).status_code == 404
    assert client.get(f"/v1/files/{output}/content", headers=bob.headers).status_code == 404
    assert client.get("/v1/batches", headers=bob.headers).json()["data"] == []
    # the cancelled lease's later part is refused, and the output file stays what it was
    late = client.put(f"/v1/workers/leases/{a['lease_id']}/batch_results", content=part, headers=headers)
    assert late.status_code == 409 and late.json()["error"]["code"] == "lease_lost"
    with client.app.state.sessionmaker() as session:  # type: ignore[attr-defined]
        from coordinator.db.tables import utcnow
        from coordinator.services import batches

        store = DiskStore(client.app.state.settings.resolved_storage_dir)  # type: ignore[attr-defined]
        assert batches.expire(session=session, store=store, now=utcnow() + timedelta(hours=25)) == 1
    expired = client.get(f"/v1/batches/{ids[1]}", headers=customer.headers).json()
    assert expired["status"] == "expired" and expired["errors"]["data"][0]["code"] == "batch_expired"
    _valid(validator_for, "Batch", expired)
    _valid(validator_for, "ListBatchesResponse", client.get("/v1/batches", headers=customer.headers).json())



def test_racing_parts_answer_each_custom_id_once_on_postgresql(
    session: Session, store: BlobStore, settings: CoordinatorSettings, customer_account: AccountModel,
    service_agent: Callable[..., ServiceAgent], backend: str,
) -> None:
    """Two parts of the lease with overlapping custom_ids sent at once (a worker racing itself): each request is
    recorded once, the overlap counted as duplicates, whichever commits first."""
    import threading

    from coordinator.db.engine import make_engine, make_sessionmaker
    from coordinator.db.tables import BatchRequestModel, WorkerModel
    from coordinator.services import batch_leases

    if backend != "postgresql":
        pytest.skip("row locks are PostgreSQL's")
    agent = service_agent()
    batch = new_batch(session, store, settings, customer_account, batch_lines(60))
    lease = _claimed(agent)
    fencing, worker_id = agent.leases[lease], agent.worker_id
    parts = [[batch_answer(f"req-{i}", f"a{i}") for i in range(40)],
             [batch_answer(f"req-{i}", f"b{i}") for i in range(20, 60)]]
    engine = make_engine(settings)
    barrier, results, errors = threading.Barrier(2), [], []

    def send(answers: list[dict]) -> None:  # type: ignore[type-arg]
        try:
            with make_sessionmaker(engine)() as own:
                worker = own.get(WorkerModel, worker_id)
                data = "".join(json.dumps(a) + "\n" for a in answers).encode()
                blob = store.put(batch_leases.part_key(lease), io.BytesIO(data))
                barrier.wait()
                results.append(batch_leases.record_part(session=own, store=store, settings=settings, worker=worker, lease_id=lease,
                                                        fencing_token=fencing, blob=blob))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(p,)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    engine.dispose()
    assert errors == []
    assert sum(r["recorded"] for r in results) == 60 and sum(r["duplicates"] for r in results) == 20
    session.expire_all()
    rows = session.query(BatchRequestModel).filter_by(job_id=batch.id).all()
    assert all(r.status == "completed" for r in rows) and len({r.custom_id for r in rows}) == 60


def test_a_part_past_64_mib_is_refused_while_it_streams(
    client, customer, make_caller,  # type: ignore[no-untyped-def]
) -> None:
    from tests.fakes import FakeAgent

    file = client.post("/v1/files", headers=customer.headers, data={"purpose": "batch"},
                       files={"file": ("batch.jsonl", batch_lines(2))}).json()
    created = client.post("/v1/batches", headers=customer.headers, json={
        "input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    assert created.status_code == 200, created.text
    agent = FakeAgent.register(client, make_caller("provider", "pat").key)
    a = agent.claim(kinds=KINDS)
    assert a is not None
    line = (json.dumps(batch_answer("req-0")) + "\n").encode()
    chunk = line * (1024 * 1024 // len(line) + 1)

    def body():  # type: ignore[no-untyped-def]
        for _ in range(65):
            yield chunk

    from shared.protocol import SHA256_HEADER

    sent = client.put(f"/v1/workers/leases/{a['lease_id']}/batch_results", content=body(),
                      headers={**agent.headers(a["lease_id"]), SHA256_HEADER: "0" * 64})
    assert sent.status_code == 413, sent.text
    counts = client.get(f"/v1/batches/{created.json()['id']}", headers=customer.headers).json()["request_counts"]
    assert counts == {"total": 2, "completed": 0, "failed": 0}
    storage = Path(client.app.state.settings.resolved_storage_dir) / "batches" / a["lease_id"]  # type: ignore[attr-defined]
    assert not [p for p in storage.iterdir() if p.name != "done"]

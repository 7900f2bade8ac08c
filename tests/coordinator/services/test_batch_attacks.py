"""Hostile workers and customers against the Batch API and evaluations (`services/batches.py`, `batch_rows.py`,
`batch_leases.py`, `evaluations.py`), on a real database. Each test asserts the safe behaviour."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, FileModel, JobModel, JobStatus, LeaseModel, LeaseStatus
from coordinator.services import budgets, files
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore
from shared.errors import InvalidFile, InvalidRequest
from tests.conftest import jsonl
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
        lease = _claimed(agent)
        if attempt == 0:
            agent.upload_batch_part(lease, [batch_answer("req-0", "zero")])
        agent.complete_batch(lease)
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


# --- probes ---------------------------------------------------------------------------------------------------
from tests.coordinator.api.test_openai_schemas import _valid, validator_for  # noqa: E402,F401


def test_probe_schema_cancel_expire(validator_for, client, customer, make_caller, session, settings) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    from coordinator.db.tables import utcnow
    from coordinator.services import batches
    from shared.protocol import SHA256_HEADER
    from tests.fakes import FakeAgent

    ids = []
    for n in range(2):
        file = client.post("/v1/files", headers=customer.headers, data={"purpose": "batch"},
                           files={"file": ("batch.jsonl", batch_lines(3))}).json()
        created = client.post("/v1/batches", headers=customer.headers, json={
            "input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h",
            "metadata": {"k": "v"}})
        ids.append(created.json()["id"])
    agent = FakeAgent.register(client, make_caller("provider", "pat").key)
    a = agent.claim(kinds=["train", "verify", "export", "batch"])
    agent.events(a["lease_id"], {"type": "started", "total_steps": 3, "message": "Batch started"})
    part = (json.dumps(batch_answer(a and "req-0")) + "\n").encode()
    sent = client.put(f"/v1/workers/leases/{a['lease_id']}/batch_results", content=part,
                      headers={**agent.headers(a["lease_id"]), SHA256_HEADER: hashlib.sha256(part).hexdigest()})
    print(sent.status_code, sent.text)
    c = client.post(f"/v1/batches/{a['job_id']}/cancel", headers=customer.headers)
    print(c.status_code, c.json())
    _valid(validator_for, "Batch", c.json())
    other = [i for i in ids if i != a["job_id"]][0]
    store = BlobStore(settings.resolved_storage_dir)
    print(batches.expire(session=session, store=store, now=utcnow() + timedelta(hours=25)))
    e = client.get(f"/v1/batches/{other}", headers=customer.headers).json()
    print(e)
    _valid(validator_for, "Batch", e)
    out = client.get(f"/v1/files/{c.json()['output_file_id']}", headers=customer.headers).json()
    print(out)
    _valid(validator_for, "OpenAIFile", out)
    lst = client.get("/v1/batches", headers=customer.headers).json()
    _valid(validator_for, "ListBatchesResponse", lst)
    # part after cancel
    sent = client.put(f"/v1/workers/leases/{a['lease_id']}/batch_results", content=part,
                      headers={**agent.headers(a["lease_id"]), SHA256_HEADER: hashlib.sha256(part).hexdigest()})
    print("after cancel", sent.status_code, sent.text)
    bob = make_caller("customer", "bob")
    print("bob", client.get(f"/v1/files/{c.json()['output_file_id']}/content", headers=bob.headers).status_code,
          client.get(f"/v1/batches/{other}", headers=bob.headers).status_code,
          client.post(f"/v1/batches/{other}/cancel", headers=bob.headers).status_code,
          client.get("/v1/batches", headers=bob.headers).json())
    bad = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "tunegrid/tiny-llama", "temperature": ' + b"1" * 400 + b', "messages": [{"role": "user", "content": "hi"}]}}\n'
    r = client.post("/v1/files", headers=customer.headers, data={"purpose": "batch"}, files={"file": ("b.jsonl", bad)})
    print("overflow", r.status_code, r.text[:200])
    for blob in [b"\xef\xbb\xbf" + batch_lines(2).replace(b"\n", b"\r\n"), b"\xff\xfe" + batch_lines(1), b"\n\n", b"[]\n",
                 b'{"custom_id": "' + b"x" * 600 + b'"}\n']:
        r = client.post("/v1/files", headers=customer.headers, data={"purpose": "batch"}, files={"file": ("b.jsonl", blob)})
        print("upload", r.status_code, r.text[:150])
    assert 0


def test_probe_finalize_memory(session, store, settings, customer_account) -> None:  # type: ignore[no-untyped-def]
    import time
    import tracemalloc

    from sqlalchemy import update

    from coordinator.db.tables import BatchRequestModel
    from coordinator.services import batches

    n, size = 2000, 8192
    data = batch_lines(n, max_tokens=8192)
    file = files.upload(session=session, store=store, account=customer_account, filename="b.jsonl", purpose="batch",
                        source=io.BytesIO(data), max_bytes=10**8, min_examples=1, retention=timedelta(days=1))
    from shared.schemas.batches import BatchCreate
    t = time.monotonic()
    batch = batches.create(session=session, store=store, account=customer_account, settings=settings,
                           request=BatchCreate.model_validate({"input_file_id": file.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
    print("create", time.monotonic() - t)
    session.execute(update(BatchRequestModel).where(BatchRequestModel.job_id == batch.id).values(
        status="completed", content="x" * size, finish_reason="length", prompt_tokens=20, completion_tokens=size // 64))
    session.commit()
    session.expire_all()
    batch = session.get(JobModel, batch.id)
    t = time.monotonic()
    tracemalloc.start()
    made = batches.finalize(session=session, store=store, batch=batch)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print("finalize", time.monotonic() - t, "peak MB", peak / 1e6, "output MB", n * size / 1e6)
    assert 0

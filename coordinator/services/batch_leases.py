"""A batch lease, the worker's side: it gets the batch's requests and the custom_ids already answered (by earlier
leases of the batch), uploads its answers in parts as it goes, and completes. Each request is answered once: the
first part to bring a custom_id's answer records it, a later one is counted as a duplicate and dropped, so a
batch preempted or lost mid-way resumes elsewhere without redoing or losing a request.

A part is data the coordinator checks before it records any of it: known custom_ids, answers no longer than the
request allowed, token counts within the request's and the model's bounds, and a "context too long" claim only
where the prompt could be that long. A part that fails is refused whole (400), nothing of it kept, and counts against its worker as a failed check; a lease that
completes with requests still unanswered fails against its worker, and the batch goes on elsewhere. Billing is
per second (`metering`): a lease that ends early is billed until its last recorded answer.
"""

from __future__ import annotations

import io
import json
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.db.ids import new_id
from coordinator.db.tables import (
    BatchRequestModel, JobModel, JobStatus, LeaseKind, LeaseModel, LeaseStatus, WorkerModel, utcnow,
)
from coordinator.services import batch_rows, files, held_out
from coordinator.services.fencing import FencedLease, already_ended, fenced
from coordinator.services.job_states import change_status, record_event
from coordinator.services.lease_states import end_and_requeue, end_lease, release_suspended, renew
from coordinator.services.worker_states import count_failed_check
from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore, StoredBlob
from coordinator.services.placement import seq_len_for
from shared.batches import CUSTOM_ID, FINISH_REASONS
from shared.catalog import get_base_model
from shared.errors import Conflict, InvalidFile, InvalidRequest
from shared.protocol import LeaseComplete

MAX_PART_BYTES = 64 * 1024 * 1024
MAX_PART_LINES = 10_000
BYTES_PER_TOKEN = 64  # no tokenizer's token decodes to more (byte-level BPE: at most a few dozen)
TEMPLATE_TOKENS = 256  # what a chat template adds around a prompt (its default system turn), at most
ERROR_CODES = ("context_length_exceeded",)
MAX_MESSAGE = 500


def _batch_lease(f: FencedLease) -> None:
    if f.lease.kind != LeaseKind.batch:
        raise Conflict(f"A {f.lease.kind} lease does not report batch answers.", code="wrong_lease_kind")


def done_input(*, session: Session, store: BlobStore, lease: LeaseModel, job: JobModel) -> held_out.Input:
    """The custom_ids already answered when the lease began (JSONL, one `{"custom_id"}` a line), made once per
    lease and kept for its later claims."""
    recorded = (lease.result or {}).get("done")
    if recorded:
        return held_out.Input(recorded["key"], recorded["sha256"])
    buffer = io.BytesIO()
    count = 0
    for custom_id in session.scalars(select(BatchRequestModel.custom_id).where(
            BatchRequestModel.job_id == job.id, BatchRequestModel.status != "pending")
            .order_by(BatchRequestModel.line).execution_options(yield_per=5000)):
        buffer.write(json.dumps({"custom_id": custom_id}).encode() + b"\n")
        count += 1
    buffer.seek(0)
    blob = store.put(f"batches/{lease.id}/done", buffer)
    lease.result = {**(lease.result or {}), "done": {"key": blob.key, "sha256": blob.sha256, "count": count}}
    return held_out.Input(blob.key, blob.sha256)


def part_limit(*, session: Session, worker: WorkerModel, lease_id: str, fencing_token: int) -> int:
    f = fenced(session=session, worker=worker, lease_id=lease_id, fencing_token=fencing_token)
    _batch_lease(f)
    session.commit()
    return MAX_PART_BYTES


def part_key(lease_id: str) -> str:
    return f"batches/{lease_id}/{new_id('part-')}"


def _int(value: Any, where: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise InvalidRequest(f"{where} must be a whole number from {low} to {high}.", param="part",
                             code="batch_result_invalid")
    return value


def _parse(store: BlobStore, blob: StoredBlob) -> list[dict[str, Any]]:
    """The part's answers, each a well-formed line (nothing is checked against the batch yet)."""
    answers: list[dict[str, Any]] = []
    for number, raw in enumerate(store.iter_lines(blob.key, max_line=4 * 1024 * 1024), start=1):
        if not raw.strip():
            continue
        if len(answers) >= MAX_PART_LINES:
            raise InvalidRequest(f"A part holds at most {MAX_PART_LINES} answers.", param="part",
                                 code="batch_result_invalid")
        where = f"Line {number} of the part"
        try:
            line = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise InvalidRequest(f"{where} is not JSON.", param="part", code="batch_result_invalid") from None
        keys = set(line) if isinstance(line, dict) else set()
        answer = {"custom_id", "content", "finish_reason", "prompt_tokens", "completion_tokens"}
        if not (keys == answer or keys == {"custom_id", "error"}):
            raise InvalidRequest(f"{where} is neither an answer ({', '.join(sorted(answer))}) nor an error.",
                                 param="part", code="batch_result_invalid")
        if not isinstance(line["custom_id"], str) or not CUSTOM_ID.fullmatch(line["custom_id"]):
            raise InvalidRequest(f"{where} has no valid custom_id.", param="part", code="batch_result_invalid")
        if "error" in line:
            error = line["error"]
            if (not isinstance(error, dict) or set(error) != {"code", "message"} or error["code"] not in ERROR_CODES
                    or not isinstance(error["message"], str) or len(error["message"]) > MAX_MESSAGE):
                raise InvalidRequest(f"{where} has an error other than {', '.join(ERROR_CODES)} with a message.",
                                     param="part", code="batch_result_invalid")
        else:
            if not isinstance(line["content"], str) or line["finish_reason"] not in FINISH_REASONS:
                raise InvalidRequest(f"{where} needs content (text) and a finish_reason of "
                                     f"{' or '.join(FINISH_REASONS)}.", param="part", code="batch_result_invalid")
            _int(line["prompt_tokens"], f"{where}: prompt_tokens", 1, 10**7)
            _int(line["completion_tokens"], f"{where}: completion_tokens", 0, 10**7)
        text = line["error"]["message"] if "error" in line else line["content"]
        if "\x00" in text or not _encodable(text):
            raise InvalidRequest(f"{where} holds a NUL character or invalid Unicode.", param="part",
                                 code="batch_result_invalid")
        answers.append(line)
    return answers


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which JSON can spell and no database stores
        return False
    return True


def _check(answer: dict[str, Any], row: BatchRequestModel, max_seq_len: int) -> str | None:
    """Why an answer cannot be the request's, or None."""
    if "error" in answer:
        if row.prompt_bytes + TEMPLATE_TOKENS + row.max_tokens <= max_seq_len:
            return (f"custom_id {row.custom_id!r}: a prompt of {row.prompt_bytes} bytes cannot exceed the model's "
                    f"{max_seq_len} tokens with {row.max_tokens} to answer")
        return None
    if answer["completion_tokens"] > row.max_tokens:
        return f"custom_id {row.custom_id!r}: {answer['completion_tokens']} tokens, the request allows {row.max_tokens}"
    if answer["prompt_tokens"] > min(max_seq_len, row.prompt_bytes + TEMPLATE_TOKENS):
        return (f"custom_id {row.custom_id!r}: a prompt of {answer['prompt_tokens']} tokens, more than its "
                f"{row.prompt_bytes} bytes can make (or past the context, {max_seq_len})")
    if len(answer["content"].encode()) > BYTES_PER_TOKEN * max(answer["completion_tokens"], 1):
        return f"custom_id {row.custom_id!r}: more text than {answer['completion_tokens']} tokens can hold"
    return None


def _refused(session: Session, settings: CoordinatorSettings, worker: WorkerModel, lease_id: str,
             error: InvalidRequest | InvalidFile) -> InvalidRequest | InvalidFile:
    """A part that is not what a batch program writes counts against its worker (a lie must cost), the batch's
    events say so, and a worker suspended by it loses its leases. The error to answer with."""
    session.rollback()
    row = session.get(WorkerModel, worker.id, with_for_update=True, populate_existing=True)
    lease = session.get(LeaseModel, lease_id)
    if row is None or lease is None or lease.worker_id != row.id:
        session.rollback()
        return error
    suspended = count_failed_check(session=session, worker=row, max_failed_checks=settings.suspend_after_failed_checks)
    job = session.get(JobModel, lease.job_id)
    assert job is not None
    record_event(session=session, job=job, level="warn", data={"lease_id": lease_id, "code": error.code},
                 message=f"Worker {row.id} sent answers that failed their checks ({error.message}); none was kept")
    session.commit()
    if suspended:
        release_suspended(session=session, settings=settings, provider_ids=[row.account_id],
                          why=f"suspended after {row.failed_checks} uploads that failed their checks")
        session.commit()
    return error


def record_part(*, session: Session, store: BlobStore, settings: CoordinatorSettings, worker: WorkerModel,
                lease_id: str, fencing_token: int, blob: StoredBlob) -> dict[str, int]:
    """Record a part's answers (the first answer of each request wins); {"recorded", "duplicates", "pending"}.
    A part that fails its checks is refused whole and counts against the worker (`_refused`)."""
    try:
        return _record_part(session=session, store=store, worker=worker, lease_id=lease_id,
                            fencing_token=fencing_token, blob=blob)
    except (InvalidRequest, InvalidFile) as exc:  # InvalidFile: a line past the bound
        raise _refused(session, settings, worker, lease_id, exc) from None


def _record_part(*, session: Session, store: BlobStore, worker: WorkerModel, lease_id: str, fencing_token: int,
                 blob: StoredBlob) -> dict[str, int]:
    try:
        answers = _parse(store, blob)
        f = fenced(session=session, worker=worker, lease_id=lease_id, fencing_token=fencing_token)
        _batch_lease(f)
        max_seq_len = seq_len_for(get_base_model(f.job.model))  # the lease's context, as the program's
        ids = list({a["custom_id"] for a in answers})
        rows = {r.custom_id: r for chunk in range(0, len(ids), 1000) for r in session.scalars(
            select(BatchRequestModel).where(BatchRequestModel.job_id == f.job.id,
                                            BatchRequestModel.custom_id.in_(ids[chunk:chunk + 1000]))
            .with_for_update())}
        recorded = duplicates = 0
        now = utcnow()
        for answer in answers:
            request_row = rows.get(answer["custom_id"])
            if request_row is None:
                raise InvalidRequest(f"custom_id {answer['custom_id']!r} is not a request of this batch.",
                                     param="part", code="batch_result_rejected")
            why = _check(answer, request_row, max_seq_len)
            if why is not None:
                raise InvalidRequest(f"The part is refused: {why}.", param="part", code="batch_result_rejected")
            if request_row.status != "pending":
                duplicates += 1
                continue
            request_row.lease_id, request_row.answered_at = f.lease.id, now
            if "error" in answer:
                request_row.status, request_row.error = "failed", answer["error"]
            else:
                request_row.status, request_row.content = "completed", answer["content"]
                request_row.finish_reason = answer["finish_reason"]
                request_row.prompt_tokens = answer["prompt_tokens"]
                request_row.completion_tokens = answer["completion_tokens"]
            recorded += 1
        renew(lease=f.lease, now=now)
        session.flush()
        pending = _pending(session, f.job)
        session.commit()
    finally:
        store.delete(blob.key)  # the rows hold the answers
    return {"recorded": recorded, "duplicates": duplicates, "pending": pending}


def _pending(session: Session, job: JobModel) -> int:
    return session.scalar(select(func.count()).where(BatchRequestModel.job_id == job.id,
                                                     BatchRequestModel.status == "pending")) or 0


def complete(*, session: Session, store: BlobStore, settings: CoordinatorSettings, worker: WorkerModel,
             lease_id: str, fencing_token: int, report: LeaseComplete) -> FencedLease:
    f = fenced(session=session, worker=worker, lease_id=lease_id, fencing_token=fencing_token, allow_ended=True)
    if already_ended(f, LeaseStatus.completed):
        session.commit()
        return f
    _batch_lease(f)
    usage = report.usage.model_dump()
    pending = _pending(session, f.job)
    if pending:
        end_and_requeue(session=session, lease=f.lease, job=f.job, worker=f.worker, status=LeaseStatus.failed,
                        reason=f"completed with {pending} requests unanswered", settings=settings,
                        count_attempt=True, usage=usage, counts_against_worker=True,
                        job_reason=f"Worker {f.worker.id} stopped with {pending} requests unanswered; the rest "
                                   "goes on elsewhere")
        session.commit()
        return f
    end_lease(session=session, lease=f.lease, job=f.job, worker=f.worker, status=LeaseStatus.completed,
              reason="completed; every request answered", usage=usage)
    made = batch_rows.finalize(session=session, store=store, batch=f.job)
    found = (f.job.batch or {}).get("counts") or {}
    change_status(session=session, job=f.job, to=JobStatus.succeeded,
                  message=f"Batch completed: {found.get('completed', 0)} answered, {found.get('failed', 0)} failed",
                  data={"lease_id": f.lease.id, "files": f.job.result_files})
    files.commit_made(session, store, made)
    return f

"""The job row of a batch and its request rows: a `batch` file's requests against a base model or a fine-tune,
queued for batch leases. Made by a customer's batch (services/batches.py, which holds its cost at once) and by a
fine-tuning job's evaluation (services/evaluations.py: the budgets sweep holds it); the request rows are written
from the file in bulk, one per line, each with the bounds its answer must keep (`batch_leases.py`)."""

from __future__ import annotations

import json
import tempfile
from datetime import timedelta
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from coordinator.db.ids import new_id
from coordinator.db.tables import (
    BatchRequestModel, FileModel, FileStatus, JobKind, JobModel, JobStatus, LeaseKind, utcnow,
)
from coordinator.services import continuation, files
from coordinator.services.job_states import change_status
from coordinator.storage import BlobStore
from shared.batches import ENDPOINT, error_line, iter_requests, output_line
from shared.catalog import BaseModelSpec
from shared.jobspec import LoraSpec

BATCH_PREFIX = "batch_"
WINDOWS = {"24h": timedelta(hours=24)}
INSERT_CHUNK = 1000
SPOOL_BYTES = 8 * 1024 * 1024  # an output file past this is written through a temporary file, not memory


MESSAGE_TOKENS = 16  # what a chat template adds around each message (role, turn markers), at most


def prompt_bound(messages: tuple[dict[str, Any], ...]) -> int:
    """The most tokens a prompt's messages can make beside the template's fixed part: a byte-level vocabulary
    never takes more than one token a byte, and each message adds its turn markers."""
    return sum(len((m.get("content") or "").encode()) + MESSAGE_TOKENS for m in messages)


def new_batch(*, session: Session, store: BlobStore, file: FileModel, base: BaseModelSpec,
              start: continuation.Start | None, window: str = "24h", metadata: dict[str, str] | None = None,
              output_expires_s: int | None = None, max_price: int | None = None) -> JobModel:
    """The batch's row (added, its request rows written), `validating_files`: the caller holds it and queues it."""
    now = utcnow()
    batch = JobModel(
        id=new_id(BATCH_PREFIX), kind=JobKind.batch.value, account_id=file.account_id, model=base.id,
        initial_model=file.model if start else None, training_file_id=file.id, status=JobStatus.validating_files,
        stage=LeaseKind.batch.value, hyperparameters={"n_epochs": 1},
        lora=dict(start.parent.lora) if start else LoraSpec().model_dump(), seed=0, job_metadata=metadata,
        estimated_tokens=file.estimated_tokens or 0, result_files=[], max_price_per_gpu_hour=max_price,
        batch={"endpoint": ENDPOINT, "completion_window": window, "model": file.model, "requests": file.examples or 0,
               "expires_at": (now + WINDOWS[window]).isoformat(), "output_expires_s": output_expires_s},
    )
    if start is not None:
        batch.initial_adapter = continuation.keep(store=store, job=batch, start=start)
    session.add(batch)
    session.flush()
    _write_requests(session, store, batch, file)
    return batch


def queue(*, session: Session, batch: JobModel, message: str) -> None:
    change_status(session=session, job=batch, to=JobStatus.queued, message=message)
    batch.batch = {**(batch.batch or {}), "in_progress_at": utcnow().isoformat()}


def _write_requests(session: Session, store: BlobStore, batch: JobModel, file: FileModel) -> None:
    rows: list[dict[str, Any]] = []
    for number, request in iter_requests(store.iter_lines(files.blob_key(file.id), max_line=files.MAX_LINE_BYTES)):
        prompt = prompt_bound(request.messages)
        rows.append({"id": new_id("batchreq-"), "job_id": batch.id, "custom_id": request.custom_id, "line": number,
                     "max_tokens": request.sampling.max_tokens, "prompt_bytes": prompt, "status": "pending",
                     "prompt_tokens": 0, "completion_tokens": 0, "created_at": utcnow()})
        if len(rows) >= INSERT_CHUNK:
            session.execute(insert(BatchRequestModel), rows)
            rows = []
    if rows:
        session.execute(insert(BatchRequestModel), rows)


def counts(session: Session, batch: JobModel) -> dict[str, int]:
    """Requests answered so far (`completed`, `failed`) and in all (`total`)."""
    found = dict(session.execute(select(BatchRequestModel.status, func.count()).where(
        BatchRequestModel.job_id == batch.id).group_by(BatchRequestModel.status)).all())
    return {"total": sum(found.values()), "completed": found.get("completed", 0), "failed": found.get("failed", 0)}


def _lines(session: Session, batch: JobModel, status: str):  # type: ignore[no-untyped-def]
    return session.scalars(select(BatchRequestModel).where(BatchRequestModel.job_id == batch.id,
                                                           BatchRequestModel.status == status)
                           .order_by(BatchRequestModel.line).execution_options(yield_per=1000))


def finalize(*, session: Session, store: BlobStore, batch: JobModel) -> list[str]:
    """The output file (answered requests, in input order) and the error file (requests that could not be
    answered), as the customer's files; what the batch says of them. Returns the blob keys made (the caller
    deletes them if its commit fails)."""
    state = dict(batch.batch or {})
    created = int(batch.created_at.timestamp())
    model = state.get("model") or batch.model
    made: list[str] = []
    usage = {"input": 0, "output": 0}

    def write(kind: str, status: str, render) -> str | None:  # type: ignore[no-untyped-def]
        file_id = new_id("file-")
        buffer = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - closed below
        try:
            for row in _lines(session, batch, status):
                buffer.write(json.dumps(render(row), ensure_ascii=False).encode() + b"\n")
                usage["input"] += row.prompt_tokens
                usage["output"] += row.completion_tokens
            if not buffer.tell():
                return None
            buffer.seek(0)
            blob = store.put(files.blob_key(file_id), buffer)  # type: ignore[arg-type]
        finally:
            buffer.close()
        file = FileModel(id=file_id, account_id=batch.account_id, filename=f"{batch.id}_{kind}.jsonl",
                         purpose="batch_output", bytes=0, sha256="", status=FileStatus.processed,
                         format=f"batch-{'output' if kind == 'output' else 'errors'}", created_at=utcnow())
        if state.get("output_expires_s"):
            file.expires_at = file.created_at + timedelta(seconds=state["output_expires_s"])
        made.append(blob.key)
        file.bytes, file.sha256 = blob.bytes, blob.sha256
        session.add(file)
        return file.id

    output = write("output", "completed", lambda r: output_line(
        request_id=f"batch_req_{r.id.removeprefix('batchreq-')}", custom_id=r.custom_id,
        completion_id=f"chatcmpl-{r.id.removeprefix('batchreq-')}", model=model, created=created,
        content=r.content or "", finish_reason=r.finish_reason or "stop", prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens))
    errors = write("error", "failed", lambda r: error_line(
        request_id=f"batch_req_{r.id.removeprefix('batchreq-')}", custom_id=r.custom_id,
        code=(r.error or {}).get("code", "failed"), message=(r.error or {}).get("message", "not answered")))
    state.update(output_file_id=output, error_file_id=errors, counts=counts(session, batch),
                 usage={"input_tokens": usage["input"], "output_tokens": usage["output"]},
                 finalizing_at=utcnow().isoformat())
    batch.batch = state
    batch.result_files = [f for f in (output, errors) if f]
    return made

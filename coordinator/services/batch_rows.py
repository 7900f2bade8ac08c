"""The job row of a batch and its request rows: a `batch` file's requests against a base model or a fine-tune,
queued for batch leases. Made by a customer's batch (services/batches.py, which holds its cost at once) and by a
fine-tuning job's evaluation (services/evaluations.py: the budgets sweep holds it); the request rows are written
from the file in bulk, one per line, each with the bounds its answer must keep (`batch_leases.py`)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from coordinator.db.ids import new_id
from coordinator.db.tables import BatchRequestModel, FileModel, JobKind, JobModel, JobStatus, LeaseKind, utcnow
from coordinator.services import continuation, files
from coordinator.services.job_states import change_status
from coordinator.storage import BlobStore
from shared.batches import ENDPOINT, iter_requests
from shared.catalog import BaseModelSpec
from shared.jobspec import LoraSpec

BATCH_PREFIX = "batch_"
WINDOWS = {"24h": timedelta(hours=24)}
INSERT_CHUNK = 1000


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
        prompt = sum(len((m.get("content") or "").encode()) for m in request.messages)
        rows.append({"id": new_id("batchreq-"), "job_id": batch.id, "custom_id": request.custom_id, "line": number,
                     "max_tokens": request.sampling.max_tokens, "prompt_bytes": prompt, "status": "pending",
                     "prompt_tokens": 0, "completion_tokens": 0, "created_at": utcnow()})
        if len(rows) >= INSERT_CHUNK:
            session.execute(insert(BatchRequestModel), rows)
            rows = []
    if rows:
        session.execute(insert(BatchRequestModel), rows)

"""Models a customer can use: the base-model catalog plus the customer's own fine-tuned adapters."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, JobModel, JobStatus
from shared.catalog import CATALOG, find_base_model
from shared.errors import NotFound
from shared.schemas.models import ModelRead


def _base(m) -> ModelRead:  # type: ignore[no-untyped-def]
    return ModelRead(
        id=m.id, created=m.created, owned_by=m.owned_by, kind="base", parameters=m.parameters,
        max_seq_len=m.max_seq_len, license=m.license, hf_repo=m.hf_repo,
    )


def _fine_tuned(job: JobModel) -> ModelRead:
    assert job.fine_tuned_model is not None
    finished = job.finished_at or job.created_at
    return ModelRead(
        id=job.fine_tuned_model, created=int(finished.timestamp()), owned_by=job.account_id,
        kind="fine-tuned", base_model=job.model,
    )


def list_models(*, session: Session, account: AccountModel) -> list[ModelRead]:
    jobs = session.scalars(
        select(JobModel).where(
            JobModel.account_id == account.id, JobModel.status == JobStatus.succeeded,
            JobModel.fine_tuned_model.is_not(None),
        ).order_by(JobModel.id.desc())
    )
    return [_base(m) for m in CATALOG] + [_fine_tuned(j) for j in jobs]


def get(*, session: Session, account: AccountModel, model_id: str) -> ModelRead:
    base = find_base_model(model_id)
    if base is not None:
        return _base(base)
    job = session.scalars(
        select(JobModel).where(JobModel.account_id == account.id, JobModel.fine_tuned_model == model_id)
    ).first()
    if job is None or job.status is not JobStatus.succeeded:
        raise NotFound(f"The model {model_id!r} does not exist or you do not have access to it.",
                       param="model", code="model_not_found")
    return _fine_tuned(job)

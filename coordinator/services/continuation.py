"""The names a job's results go by (`ft:...`, and `...:ckpt-step-N` for its checkpoints), and a new job that
continues one of them: the customer's own succeeded fine-tune or kept checkpoint, on the same base model.

A continued job starts from that adapter's weights with the same LoRA shape. The coordinator keeps its own
name for the adapter's blob (`jobs/<id>/initial`, a hard link), so deleting the earlier result or pruning the
checkpoint later cannot pull it from under the job; the worker gets it like any other lease input and unpacks
only the weights member the coordinator names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, FileModel, JobCheckpointModel, JobModel, JobStatus
from coordinator.services import files
from coordinator.storage import BlobStore, checkpoint_key
from shared.errors import InvalidRequest

FINE_TUNED_PREFIX = "ft:"
CHECKPOINT_MARK = ":ckpt-step-"
ADAPTER_MEMBER = "adapter/adapter_model.safetensors"  # in a job's result archive
CHECKPOINT_MEMBER = "resume/adapter_model.safetensors"  # in a checkpoint archive (shared.checkpoint)
Member = Literal["adapter/adapter_model.safetensors", "resume/adapter_model.safetensors"]


def fine_tuned_model_name(job: JobModel) -> str:
    return f"{FINE_TUNED_PREFIX}{job.model}:{job.account_id}:{job.suffix or ''}:{job.id}"


def checkpoint_name(job: JobModel, step: int) -> str:
    """OpenAI's form: the job's fine-tuned model name and the step."""
    return f"{fine_tuned_model_name(job)}{CHECKPOINT_MARK}{step}"


def is_continuation(model: str) -> bool:
    return model.startswith(FINE_TUNED_PREFIX)


@dataclass(frozen=True, slots=True)
class Start:
    """Where a continued job starts: the earlier job (its base and LoRA shape) and the adapter blob."""

    parent: JobModel
    key: str
    sha256: str
    member: Member
    step: int | None  # the checkpoint's step; None for the fine-tune's final adapter


def _not_found(name: str) -> InvalidRequest:
    return InvalidRequest(f"Model {name!r} does not exist or you do not have access to it.", param="model",
                          code="model_not_found")


def resolve(*, session: Session, account: AccountModel, name: str) -> Start:
    """The caller's fine-tune or checkpoint of that name, ready to continue; anyone else's is the same 400 as a
    missing one."""
    if CHECKPOINT_MARK in name:
        checkpoint = session.scalars(
            select(JobCheckpointModel).join(JobModel, JobModel.id == JobCheckpointModel.job_id)
            .where(JobCheckpointModel.fine_tuned_model_checkpoint == name, JobModel.account_id == account.id)
        ).first()
        if checkpoint is None:
            raise _not_found(name)
        parent = session.get(JobModel, checkpoint.job_id)
        assert parent is not None
        if checkpoint.blob_sha256 is None or checkpoint.quarantined_at is not None:
            raise InvalidRequest(f"Checkpoint {name!r} is no longer kept (or failed its checks); continue from "
                                 "one the job's checkpoint list shows.", param="model", code="checkpoint_not_available")
        return Start(parent=parent, key=checkpoint_key(checkpoint.id), sha256=checkpoint.blob_sha256,
                     member=CHECKPOINT_MEMBER, step=checkpoint.step_number)
    parent = session.scalars(
        select(JobModel).where(JobModel.account_id == account.id, JobModel.fine_tuned_model == name)
    ).first()
    if parent is None or parent.status is not JobStatus.succeeded or not parent.result_files:
        raise _not_found(name)
    result = session.get(FileModel, parent.result_files[0])
    if result is None or result.deleted_at is not None:
        raise InvalidRequest(f"The adapter of {name!r} was deleted; it cannot be continued.", param="model",
                             code="model_not_available")
    return Start(parent=parent, key=files.blob_key(result.id), sha256=result.sha256, member=ADAPTER_MEMBER, step=None)


def lora_for(start: Start, asked: dict[str, Any] | None) -> dict[str, Any]:
    """The continued job's LoRA: the earlier job's; a different shape asked for cannot hold its weights."""
    if asked is not None and any(asked.get(k) not in (None, start.parent.lora.get(k))
                                 for k in ("r", "alpha", "target_modules")):
        raise InvalidRequest(
            f"A continued job keeps the LoRA shape of {start.parent.id} (r={start.parent.lora['r']}, "
            f"alpha={start.parent.lora['alpha']}, target_modules={start.parent.lora['target_modules']!r}); "
            "leave lora out or give the same.", param="lora", code="lora_mismatch")
    return {**start.parent.lora, **({"dropout": asked["dropout"]} if asked and "dropout" in asked else {})}


def initial_key(job_id: str) -> str:
    return f"jobs/{job_id}/initial"


def keep(*, store: BlobStore, job: JobModel, start: Start) -> dict[str, Any]:
    """The job's own name for the starting adapter's blob; what `job.initial_adapter` records."""
    try:
        store.copy(start.key, initial_key(job.id))
    except FileNotFoundError:  # pruned or collected since it was looked up
        raise InvalidRequest("The adapter to continue from is no longer kept; continue from one the job's "
                             "checkpoint list shows as available.", param="model",
                             code="checkpoint_not_available") from None
    return {"key": initial_key(job.id), "sha256": start.sha256, "member": start.member, "job_id": start.parent.id,
            "step": start.step}

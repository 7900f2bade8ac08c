"""`/v1/fine_tuning/jobs`: create, list, retrieve, cancel, pause, resume, events and checkpoints."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Query, Request

from coordinator.api.deps import CustomerCaller, SettingsDep, StoreDep, reject_unknown_query, run_in_session
from coordinator.api.errors import ERROR_RESPONSES
from coordinator.db.tables import JobCheckpointModel, JobEventModel, JobModel
from coordinator.services import billing, integrations, jobs, replicas
from shared.errors import InvalidRequest
from shared.money import micros_to_usd
from shared.schemas.jobs import (
    CheckpointList, CheckpointRead, DpoHyperparametersRead, DpoMethodRead, EarlyStoppingRead, EvaluationRead,
    HyperparametersRead,
    JobCreate, JobEventList, JobEventRead, JobList, JobRead,
    LoraRead, MethodRead, ReplicaRead, SupervisedMethodRead, VerificationRead,
)

# Query strictness is per route: only the list takes `metadata[KEY]` filters.
router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=ERROR_RESPONSES)
STRICT_QUERY = [reject_unknown_query()]

Cursor = Annotated[str | None, Query(max_length=64)]
_METADATA_PARAM = re.compile(r"^metadata\[(.{1,64})\]$")


def _ts(value) -> int | None:  # type: ignore[no-untyped-def]
    return int(value.timestamp()) if value is not None else None


def method_read(job: JobModel) -> MethodRead:
    if job.method == "dpo":
        return MethodRead(type="dpo", dpo=DpoMethodRead(hyperparameters=DpoHyperparametersRead(
            **{"beta": "auto", **job.hyperparameters})))
    return MethodRead(supervised=SupervisedMethodRead(hyperparameters=HyperparametersRead(**job.hyperparameters)))


def job_read(job: JobModel) -> JobRead:
    hp = HyperparametersRead(**job.hyperparameters)
    cost = billing.job_cost(job, pending=replicas.pending_charge(job))
    return JobRead(
        id=job.id, created_at=int(job.created_at.timestamp()), error=job.error,  # type: ignore[arg-type]
        fine_tuned_model=job.fine_tuned_model, finished_at=_ts(job.finished_at), hyperparameters=hp,
        model=job.initial_model or job.model, organization_id=job.account_id, result_files=job.result_files,
        status=job.status.value, trained_tokens=job.trained_tokens,  # type: ignore[arg-type]
        training_file=job.training_file_id, validation_file=job.validation_file_id, seed=job.seed,
        estimated_finish=_ts(job.estimated_finish),
        integrations=integrations.public(job),
        method=method_read(job), metadata=job.job_metadata,
        early_stopping=EarlyStoppingRead(**job.early_stopping) if job.early_stopping else None,
        lora=LoraRead(**job.lora),
        max_price_per_gpu_hour=micros_to_usd(job.max_price_per_gpu_hour) if job.max_price_per_gpu_hour else None,
        max_price_source=job.max_price_source,  # type: ignore[arg-type]
        max_cost=micros_to_usd(job.max_cost) if job.max_cost else None,
        min_vram_gb=job.min_vram_gb, gpu_filter=job.gpu_filter, trusted_hosts_only=job.trusted_hosts_only,
        estimated_tokens=job.estimated_tokens,
        cost=micros_to_usd(cost.so_far), cost_held=micros_to_usd(cost.held),
        verified=(job.verification or {}).get("status") == "passed", verification=verification_read(job),
        export=(job.export or {}).get("formats"),
        evaluation=EvaluationRead(**{k: v for k, v in job.evaluation.items() if k in EvaluationRead.model_fields})
        if job.evaluation else None,
    )


def verification_read(job: JobModel) -> VerificationRead:
    state = job.verification or {}
    agreed = next((v for v in reversed(state.get("verdicts", [])) if v.get("agrees")), None)
    figures = (agreed or {}).get("figures") or {}
    return VerificationRead(
        mode=job.verification_mode,  # type: ignore[arg-type]
        status=state.get("status", "not_selected"), reason=state.get("reason"),
        heldout_base_loss=figures.get("heldout_base_loss"), heldout_adapter_loss=figures.get("heldout_adapter_loss"),
        valid_adapter_loss=figures.get("valid_adapter_loss"),
        reported_valid_loss=(state.get("reported") or {}).get("final_eval_loss"),
        held_out_examples=(job.held_out or {}).get("examples", 0),
        replicas=[ReplicaRead(worker_id=r["worker_id"], heldout_adapter_loss=r["heldout_adapter_loss"],
                              outcome=r["outcome"]) for r in replicas.of(job)],
    )


def event_read(event: JobEventModel) -> JobEventRead:
    return JobEventRead(
        id=event.id, created_at=int(event.created_at.timestamp()), level=event.level,  # type: ignore[arg-type]
        message=event.message, type=event.type, data=event.data or {},  # type: ignore[arg-type]
    )


def checkpoint_read(checkpoint: JobCheckpointModel) -> CheckpointRead:
    return CheckpointRead(
        id=checkpoint.id, created_at=int(checkpoint.created_at.timestamp()),
        fine_tuned_model_checkpoint=checkpoint.fine_tuned_model_checkpoint, fine_tuning_job_id=checkpoint.job_id,
        metrics=checkpoint.metrics, step_number=checkpoint.step_number,
        available=checkpoint.blob_sha256 is not None and checkpoint.quarantined_at is None,
    )


@router.post("", response_model=JobRead, dependencies=STRICT_QUERY)
async def create_job(body: JobCreate, caller: CustomerCaller, settings: SettingsDep, store: StoreDep) -> JobRead:
    """The job as it was created, `validating_files` (OpenAI's first status); its job-time checks run in a second
    step before the answer goes out, so the next call already finds it queued (a sweep finishes any a process
    stopped between the two)."""
    job = await caller.run(jobs.create, store=store, request=body, settings=settings)
    created = job_read(job)
    await run_in_session(caller.state, lambda session: jobs.finish_validation(session=session, store=store,
                                                                               job_id=job.id))
    return created


@router.get("", response_model=JobList, dependencies=[reject_unknown_query("metadata[")])
async def list_jobs(
    request: Request, caller: CustomerCaller,
    after: Cursor = None, limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    metadata: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if key.startswith("metadata"):
            match = _METADATA_PARAM.match(key)
            if match is None:
                raise InvalidRequest("Filter by metadata as metadata[KEY]=VALUE.", param="metadata")
            metadata[match.group(1)] = value
    rows, has_more = await caller.run(jobs.list_jobs, after=after, limit=limit, metadata=metadata)
    return JobList(data=[job_read(j) for j in rows], has_more=has_more)


@router.get("/{fine_tuning_job_id}", response_model=JobRead, dependencies=STRICT_QUERY)
async def retrieve_job(fine_tuning_job_id: str, caller: CustomerCaller) -> JobRead:
    return job_read(await caller.run(jobs.get, job_id=fine_tuning_job_id))


@router.post("/{fine_tuning_job_id}/cancel", response_model=JobRead, dependencies=STRICT_QUERY)
async def cancel_job(fine_tuning_job_id: str, caller: CustomerCaller) -> JobRead:
    return job_read(await caller.run(jobs.cancel, job_id=fine_tuning_job_id))


@router.post("/{fine_tuning_job_id}/pause", response_model=JobRead, dependencies=STRICT_QUERY)
async def pause_job(fine_tuning_job_id: str, caller: CustomerCaller) -> JobRead:
    return job_read(await caller.run(jobs.pause, job_id=fine_tuning_job_id))


@router.post("/{fine_tuning_job_id}/resume", response_model=JobRead, dependencies=STRICT_QUERY)
async def resume_job(fine_tuning_job_id: str, caller: CustomerCaller, settings: SettingsDep) -> JobRead:
    return job_read(await caller.run(jobs.resume, job_id=fine_tuning_job_id, settings=settings))


@router.get("/{fine_tuning_job_id}/events", response_model=JobEventList, dependencies=STRICT_QUERY)
async def list_job_events(
    fine_tuning_job_id: str, caller: CustomerCaller,
    after: Cursor = None, limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> JobEventList:
    rows, has_more = await caller.run(jobs.list_events, job_id=fine_tuning_job_id, after=after, limit=limit)
    return JobEventList(data=[event_read(e) for e in rows], has_more=has_more)


@router.get("/{fine_tuning_job_id}/checkpoints", response_model=CheckpointList, dependencies=STRICT_QUERY)
async def list_job_checkpoints(
    fine_tuning_job_id: str, caller: CustomerCaller,
    after: Cursor = None, limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> CheckpointList:
    rows, has_more = await caller.run(jobs.list_checkpoints, job_id=fine_tuning_job_id, after=after, limit=limit)
    return CheckpointList(
        data=[checkpoint_read(c) for c in rows], has_more=has_more,
        first_id=rows[0].id if rows else None, last_id=rows[-1].id if rows else None,
    )

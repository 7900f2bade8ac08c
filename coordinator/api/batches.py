"""`/v1/batches`: OpenAI's Batch API (create, retrieve, cancel, list) for `/v1/chat/completions` requests against a
base or fine-tuned model, run on the fleet; output and error files download through `/v1/files/{id}/content`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from coordinator.api.deps import CustomerCaller, SettingsDep, StoreDep, reject_unknown_query
from coordinator.api.errors import ERROR_RESPONSES
from coordinator.services import batches, billing
from coordinator.services.batches import BatchView
from shared.money import micros_to_usd
from shared.schemas.batches import BatchCreate, BatchErrors, BatchList, BatchRead, BatchRequestCounts, BatchUsage

router = APIRouter(prefix="/v1/batches", tags=["batches"], responses=ERROR_RESPONSES,
                   dependencies=[reject_unknown_query()])


def _ts(value: str | datetime | None) -> int | None:
    if value is None:
        return None
    return int((datetime.fromisoformat(value) if isinstance(value, str) else value).timestamp())


def batch_read(view: BatchView) -> BatchRead:
    batch, state = view.batch, view.batch.batch or {}
    status = batches.status_name(batch)
    usage = state.get("usage")
    cost = billing.job_cost(batch)
    finished = _ts(batch.finished_at)
    error = batch.error if status in ("failed", "expired") else None
    return BatchRead(
        id=batch.id, endpoint=state.get("endpoint", ""), model=state.get("model"), input_file_id=batch.training_file_id,
        completion_window=state.get("completion_window", "24h"), status=status,  # type: ignore[arg-type]
        output_file_id=state.get("output_file_id"), error_file_id=state.get("error_file_id"),
        created_at=int(batch.created_at.timestamp()), in_progress_at=_ts(state.get("in_progress_at")),
        expires_at=_ts(state.get("expires_at")), finalizing_at=_ts(state.get("finalizing_at")),
        completed_at=finished if status == "completed" else None, failed_at=finished if status == "failed" else None,
        expired_at=_ts(state.get("expired_at")), cancelling_at=_ts(state.get("cancelling_at")),
        cancelled_at=finished if status == "cancelled" else None,
        request_counts=BatchRequestCounts(**view.counts),
        errors=BatchErrors(data=[{"code": error["code"], "message": error["message"]}]) if error else None,  # type: ignore[list-item]
        usage=BatchUsage(input_tokens=usage["input_tokens"], output_tokens=usage["output_tokens"],
                         total_tokens=usage["input_tokens"] + usage["output_tokens"],
                         input_tokens_details={"cached_tokens": 0},
                         output_tokens_details={"reasoning_tokens": 0}) if usage else None,
        metadata=batch.job_metadata, cost=micros_to_usd(cost.so_far), cost_held=micros_to_usd(cost.held),
    )


@router.post("", response_model=BatchRead, response_model_exclude_none=True)
async def create_batch(body: BatchCreate, caller: CustomerCaller, settings: SettingsDep, store: StoreDep) -> BatchRead:
    created = await caller.run(batches.create, store=store, request=body, settings=settings)
    return batch_read(await caller.run(batches.view, batch_id=created.id))


@router.get("", response_model=BatchList, response_model_exclude_none=True)
async def list_batches(caller: CustomerCaller, after: Annotated[str | None, Query(max_length=64)] = None,
                       limit: Annotated[int, Query(ge=1, le=100)] = 20) -> BatchList:
    views, has_more = await caller.run(batches.list_views, after=after, limit=limit)
    data = [batch_read(v) for v in views]
    return BatchList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                     last_id=data[-1].id if data else None)


@router.get("/{batch_id}", response_model=BatchRead, response_model_exclude_none=True)
async def retrieve_batch(batch_id: str, caller: CustomerCaller) -> BatchRead:
    return batch_read(await caller.run(batches.view, batch_id=batch_id))


@router.post("/{batch_id}/cancel", response_model=BatchRead, response_model_exclude_none=True)
async def cancel_batch(batch_id: str, caller: CustomerCaller, store: StoreDep) -> BatchRead:
    await caller.run(batches.cancel, store=store, batch_id=batch_id)
    return batch_read(await caller.run(batches.view, batch_id=batch_id))

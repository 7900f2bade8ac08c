"""`/v1/fine_tuning/jobs/{id}/exports`: request an export of a fine-tune (or of one of its checkpoints), list,
retrieve and cancel its exports; their files download through `/v1/files/{id}/content`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from coordinator.api.deps import CustomerCaller, SettingsDep, StoreDep, reject_unknown_query
from coordinator.api.errors import ERROR_RESPONSES
from coordinator.db.tables import JobModel
from coordinator.services import billing, exports
from shared.money import micros_to_usd
from shared.schemas.exports import ExportCreate, ExportFileRead, ExportList, ExportRead

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=ERROR_RESPONSES)
STRICT_QUERY = [reject_unknown_query()]
Cursor = Annotated[str | None, Query(max_length=64)]


def _ts(value) -> int | None:  # type: ignore[no-untyped-def]
    return int(value.timestamp()) if value is not None else None


def export_read(export: JobModel) -> ExportRead:
    state = export.export or {}
    cost = billing.job_cost(export)
    return ExportRead(
        id=export.id, fine_tuning_job_id=export.parent_job_id or "", model=state.get("model", ""),
        created_at=int(export.created_at.timestamp()), finished_at=_ts(export.finished_at),
        status=export.status.value, formats=list(state.get("formats") or ()),  # type: ignore[arg-type]
        files=[ExportFileRead(**entry) for entry in state.get("files") or ()], error=export.error,  # type: ignore[arg-type]
        cost=micros_to_usd(cost.so_far), cost_held=micros_to_usd(cost.held),
    )


@router.post("/{fine_tuning_job_id}/exports", response_model=ExportRead, dependencies=STRICT_QUERY)
async def create_export(fine_tuning_job_id: str, body: ExportCreate, caller: CustomerCaller, settings: SettingsDep,
                        store: StoreDep) -> ExportRead:
    return export_read(await caller.run(exports.create, store=store, job_id=fine_tuning_job_id, request=body,
                                        settings=settings))


@router.get("/{fine_tuning_job_id}/exports", response_model=ExportList, dependencies=STRICT_QUERY)
async def list_exports(fine_tuning_job_id: str, caller: CustomerCaller, after: Cursor = None,
                       limit: Annotated[int, Query(ge=1, le=100)] = 20) -> ExportList:
    rows, has_more = await caller.run(exports.list_exports, job_id=fine_tuning_job_id, after=after, limit=limit)
    return ExportList(data=[export_read(e) for e in rows], has_more=has_more)


@router.get("/{fine_tuning_job_id}/exports/{export_id}", response_model=ExportRead, dependencies=STRICT_QUERY)
async def retrieve_export(fine_tuning_job_id: str, export_id: str, caller: CustomerCaller) -> ExportRead:
    return export_read(await caller.run(exports.get, job_id=fine_tuning_job_id, export_id=export_id))


@router.post("/{fine_tuning_job_id}/exports/{export_id}/cancel", response_model=ExportRead,
             dependencies=STRICT_QUERY)
async def cancel_export(fine_tuning_job_id: str, export_id: str, caller: CustomerCaller) -> ExportRead:
    return export_read(await caller.run(exports.cancel, job_id=fine_tuning_job_id, export_id=export_id))

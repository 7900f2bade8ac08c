"""`/v1/models`: the base-model catalog and the caller's fine-tuned adapters (OpenAI's Models API)."""

from __future__ import annotations

from fastapi import APIRouter

from coordinator.api.deps import AnyCaller, reject_unknown_query
from coordinator.api.errors import ERROR_RESPONSES
from coordinator.services import catalog
from shared.schemas.models import ModelList, ModelRead

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES,
                   dependencies=[reject_unknown_query()])


@router.get("", response_model=ModelList, response_model_exclude_none=True)
async def list_models(caller: AnyCaller) -> ModelList:
    return ModelList(data=await caller.run(catalog.list_models))


@router.get("/{model:path}", response_model=ModelRead, response_model_exclude_none=True)
async def retrieve_model(model: str, caller: AnyCaller) -> ModelRead:
    return await caller.run(catalog.get, model_id=model)

"""`/v1/models`: the base-model catalog and the caller's fine-tuned adapters (OpenAI's Models API)."""

from __future__ import annotations

from fastapi import APIRouter

from coordinator.api.deps import reject_unknown_query, CurrentAccount, SessionDep
from coordinator.api.errors import ERROR_RESPONSES
from coordinator.services import models
from shared.schemas.models import ModelList, ModelRead

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES,
                   dependencies=[reject_unknown_query()])


@router.get("", response_model=ModelList, response_model_exclude_none=True)
def list_models(account: CurrentAccount, session: SessionDep) -> ModelList:
    return ModelList(data=models.list_models(session=session, account=account))


@router.get("/{model:path}", response_model=ModelRead, response_model_exclude_none=True)
def retrieve_model(model: str, account: CurrentAccount, session: SessionDep) -> ModelRead:
    return models.get(session=session, account=account, model_id=model)

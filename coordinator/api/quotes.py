"""`POST /v1/fine_tuning/quotes`: the price of a job before it is created."""

from __future__ import annotations

from fastapi import APIRouter

from coordinator.api.deps import CustomerCaller, SettingsDep, reject_unknown_query
from coordinator.api.errors import ERROR_RESPONSES
from coordinator.services import quotes
from shared.schemas.quotes import QuoteCreate, QuoteRead

router = APIRouter(prefix="/v1/fine_tuning/quotes", tags=["fine-tuning"], responses=ERROR_RESPONSES)


@router.post("", response_model=QuoteRead, dependencies=[reject_unknown_query()])
async def create_quote(body: QuoteCreate, caller: CustomerCaller, settings: SettingsDep) -> QuoteRead:
    return await caller.run(quotes.quote, request=body, settings=settings)

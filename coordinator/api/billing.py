"""`/v1/billing`: a customer's balance, usage, transactions and prepaid top-ups (Stripe Checkout). A provider's
earnings are `providers.py`; Stripe's webhook is `webhooks.py`."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request

from coordinator.api.deps import AnyCaller, CustomerCaller, GatewayDep, SettingsDep, call_stripe, reject_unknown_query
from coordinator.api.errors import ERROR_RESPONSES
from coordinator.db.tables import TopupModel
from coordinator.services import billing, topups
from shared.errors import InvalidRequest
from shared.money import micros_to_usd, usd_to_micros
from shared.schemas.billing import (
    BalanceRead, TopupCreate, TopupList, TopupRead, TransactionList, TransactionRead, UsageList, UsageRead,
)

router = APIRouter(tags=["billing"], responses=ERROR_RESPONSES)
STRICT_QUERY = [reject_unknown_query()]
Cursor = Annotated[str | None, Query(max_length=64)]


DAY = r"^\d{4}-\d{2}-\d{2}$"


def _day(value: str | None, param: str) -> date | None:
    """A YYYY-MM-DD day, strictly (lax parsing would read `0` as 1970-01-01)."""
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{param} is not a valid day (YYYY-MM-DD).", param=param) from None


def _ts(value) -> int:  # type: ignore[no-untyped-def]
    return int(value.timestamp())


def topup_read(topup: TopupModel) -> TopupRead:
    return TopupRead(id=topup.id, amount=micros_to_usd(topup.amount), status=topup.status.value,  # type: ignore[arg-type]
                     checkout_url=topup.checkout_url if topup.status.value == "pending" else None,
                     created_at=_ts(topup.created_at))


@router.get("/v1/billing/balance", response_model=BalanceRead, dependencies=STRICT_QUERY)
async def get_balance(caller: CustomerCaller, settings: SettingsDep) -> BalanceRead:
    result = await caller.run(billing.balance_of)
    return BalanceRead(available=micros_to_usd(result.available), held=micros_to_usd(result.held),
                       topups_enabled=settings.stripe_enabled)


@router.get("/v1/billing/usage", response_model=UsageList, dependencies=STRICT_QUERY)
async def get_usage(
    caller: CustomerCaller, group_by: Literal["job", "day"] = "day",
    start: Annotated[str | None, Query(pattern=DAY, description="First UTC day, YYYY-MM-DD")] = None,
    end: Annotated[str | None, Query(pattern=DAY, description="Last UTC day, YYYY-MM-DD")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> UsageList:
    first, last = _day(start, "start"), _day(end, "end")
    if first and last and first > last:
        raise InvalidRequest("start is after end.", param="start")
    rows = await caller.run(billing.usage, group_by=group_by, start=first, end=last, limit=limit)
    return UsageList(group_by=group_by, data=[UsageRead(
        job_id=r.key if group_by == "job" else None, date=r.key if group_by == "day" else None, gpu_class=r.gpu_class,
        price_per_gpu_hour=micros_to_usd(r.price_per_gpu_hour), leases=r.leases, seconds=r.seconds,
        cost=micros_to_usd(r.cost)) for r in rows])


@router.get("/v1/billing/transactions", response_model=TransactionList, dependencies=STRICT_QUERY)
async def list_transactions(
    caller: AnyCaller, after: Cursor = None, limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> TransactionList:
    rows, has_more = await caller.run(billing.transactions, after=after, limit=limit)
    return TransactionList(has_more=has_more, data=[TransactionRead(
        id=t.row.id, type=t.row.kind, created_at=_ts(t.row.created_at), description=t.row.description,
        available=micros_to_usd(t.available), held=micros_to_usd(t.held), payable=micros_to_usd(t.payable),
        job_id=t.row.job_id, lease_id=t.row.lease_id) for t in rows])


@router.post("/v1/billing/topups", response_model=TopupRead, dependencies=STRICT_QUERY)
async def create_topup(
    request: Request, body: TopupCreate, caller: CustomerCaller, settings: SettingsDep, gateway: GatewayDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> TopupRead:
    topup_id, row_id = await caller.run(topups.prepare, amount=usd_to_micros(body.amount),
                                        request_key=idempotency_key, settings=settings, gateway=gateway)
    if row_id is not None and gateway is not None:
        await call_stripe(request.app.state, gateway, row_id)
    return topup_read(await caller.run(topups.checked, topup_id=topup_id))


@router.get("/v1/billing/topups", response_model=TopupList, dependencies=STRICT_QUERY)
async def list_topups(caller: CustomerCaller, after: Cursor = None,
                      limit: Annotated[int, Query(ge=1, le=100)] = 20) -> TopupList:
    rows, has_more = await caller.run(topups.list_topups, after=after, limit=limit)
    return TopupList(data=[topup_read(t) for t in rows], has_more=has_more)

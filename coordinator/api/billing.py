"""`/v1/billing` (customers: balance, usage, transactions, top-ups; Stripe's webhook) and `/v1/providers/me`
(providers: earnings and the Stripe Connect payout account)."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

import anyio.to_thread
import stripe
from fastapi import APIRouter, Depends, Header, Query, Request
from starlette.datastructures import State

from coordinator.api.deps import AnyCaller, CustomerCaller, ProviderCaller, SettingsDep, reject_unknown_query, run_in_session
from coordinator.api.errors import ERROR_RESPONSES
from coordinator.db.tables import PayoutAccountModel, PayoutModel, TopupModel
from coordinator.services import billing, outbox, payouts, topups, webhooks
from coordinator.stripe_gateway import StripeGateway
from shared.errors import InvalidRequest
from shared.money import micros_to_usd, usd_to_micros
from shared.schemas.billing import (
    BalanceRead, EarningsRead, PayoutAccountRead, PayoutRead, TopupCreate, TopupList, TopupRead, TransactionList,
    TransactionRead, UsageList, UsageRead,
)

router = APIRouter(tags=["billing"], responses=ERROR_RESPONSES)
STRICT_QUERY = [reject_unknown_query()]
Cursor = Annotated[str | None, Query(max_length=64)]
WEBHOOK_BODY_LIMIT = 512 * 1024


async def get_gateway(request: Request) -> StripeGateway | None:
    return request.app.state.stripe


GatewayDep = Annotated[StripeGateway | None, Depends(get_gateway)]


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


async def send(state: State, gateway: StripeGateway, row_id: str) -> None:
    """One outbox call from a request: the database hops hold a connection only around Stripe's call, never
    during it, so a slow Stripe cannot starve the API of connections."""
    call = await run_in_session(state, lambda session: outbox.pending_call(session=session, row_id=row_id))
    if call is None:
        return
    answer = await anyio.to_thread.run_sync(outbox.make_call, gateway, call)
    await run_in_session(state, lambda session: outbox.record_answer(session=session, row_id=row_id, answer=answer))


@router.post("/v1/billing/topups", response_model=TopupRead, dependencies=STRICT_QUERY)
async def create_topup(
    request: Request, body: TopupCreate, caller: CustomerCaller, settings: SettingsDep, gateway: GatewayDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> TopupRead:
    topup_id, row_id = await caller.run(topups.prepare, amount=usd_to_micros(body.amount),
                                        request_key=idempotency_key, settings=settings, gateway=gateway)
    if row_id is not None and gateway is not None:
        await send(request.app.state, gateway, row_id)
    return topup_read(await caller.run(topups.checked, topup_id=topup_id))


@router.get("/v1/billing/topups", response_model=TopupList, dependencies=STRICT_QUERY)
async def list_topups(caller: CustomerCaller, after: Cursor = None,
                      limit: Annotated[int, Query(ge=1, le=100)] = 20) -> TopupList:
    rows, has_more = await caller.run(topups.list_topups, after=after, limit=limit)
    return TopupList(data=[topup_read(t) for t in rows], has_more=has_more)


@router.post("/webhooks/stripe", dependencies=STRICT_QUERY, include_in_schema=True)
async def stripe_webhook(
    request: Request, settings: SettingsDep,
    stripe_signature: Annotated[str, Header(alias="Stripe-Signature", max_length=4096)],
) -> dict[str, str]:
    """Stripe's events, verified against the endpoint's signing secret; a replayed event changes nothing."""
    if not settings.stripe_webhook_secret:
        raise topups.payments_not_configured()
    payload = await request.body()
    if len(payload) > WEBHOOK_BODY_LIMIT:
        raise InvalidRequest("Webhook payload too large.", code="payload_too_large")
    try:
        event = stripe.Webhook.construct_event(payload, stripe_signature, settings.stripe_webhook_secret,
                                               tolerance=settings.webhook_tolerance_s)
    except stripe.SignatureVerificationError as exc:
        raise InvalidRequest(f"Invalid Stripe-Signature: {exc.user_message or exc}", param="Stripe-Signature",
                             code="invalid_signature") from None
    except ValueError:
        raise InvalidRequest("The webhook payload is not a Stripe event.", code="invalid_payload") from None
    body = event.to_dict()
    if not isinstance(body.get("data"), dict) or not isinstance(body["data"].get("object"), dict) or "type" not in body:
        raise InvalidRequest("The webhook payload is not a Stripe event.", code="invalid_payload")
    outcome = await run_in_session(request.app.state, lambda session: webhooks.handle_event(session=session, event=body))
    return {"received": "true", "outcome": outcome}


# --- providers ------------------------------------------------------------------------------------

def payout_account_read(row: PayoutAccountModel, url: str | None = None) -> PayoutAccountRead:
    return PayoutAccountRead(stripe_account_id=row.stripe_account_id, payouts_enabled=row.payouts_enabled,
                             details_submitted=row.details_submitted, onboarding_url=url)


def payout_read(row: PayoutModel) -> PayoutRead:
    return PayoutRead(id=row.id, amount=micros_to_usd(row.amount), status=row.status.value,  # type: ignore[arg-type]
                      destination=row.destination, stripe_transfer_id=row.stripe_transfer_id, failure=row.failure,
                      created_at=_ts(row.created_at))


@router.get("/v1/providers/me/earnings", response_model=EarningsRead, dependencies=STRICT_QUERY)
async def get_earnings(caller: ProviderCaller, settings: SettingsDep) -> EarningsRead:
    e = await caller.run(payouts.earnings)
    return EarningsRead(
        payable=micros_to_usd(e.payable), pending_payouts=micros_to_usd(e.pending), paid_out=micros_to_usd(e.paid),
        lifetime_earned=micros_to_usd(e.lifetime), minimum_payout=micros_to_usd(settings.min_payout),
        payouts_enabled=settings.stripe_enabled and bool(e.payout_account and e.payout_account.payouts_enabled),
        payout_account=payout_account_read(e.payout_account) if e.payout_account else None,
        payouts=[payout_read(p) for p in e.payouts],
    )


@router.post("/v1/providers/me/payout-account", response_model=PayoutAccountRead, dependencies=STRICT_QUERY)
async def create_payout_account(request: Request, caller: ProviderCaller, settings: SettingsDep,
                                gateway: GatewayDep) -> PayoutAccountRead:
    """Create (once) the provider's Stripe Connect account and return a fresh onboarding link."""
    account_row = await caller.run(payouts.account_call, gateway=gateway)  # 400 without Stripe
    assert gateway is not None
    if account_row is not None:
        await send(request.app.state, gateway, account_row)
    link_row = await caller.run(payouts.link_call, settings=settings)
    await send(request.app.state, gateway, link_row)
    onboarding = await caller.run(payouts.onboarding, link_row_id=link_row)
    return payout_account_read(onboarding.account, onboarding.url)

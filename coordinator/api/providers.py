"""`/v1/providers/me`: a provider's earnings and payouts, and its Stripe Connect payout account. A provider's
machines are `workers.py`."""

from __future__ import annotations

from fastapi import APIRouter, Request

from coordinator.api.deps import GatewayDep, ProviderCaller, SettingsDep, call_stripe, reject_unknown_query
from coordinator.api.errors import ERROR_RESPONSES
from coordinator.db.tables import PayoutAccountModel, PayoutModel
from coordinator.services import payouts
from shared.money import micros_to_usd
from shared.schemas.billing import EarningsRead, PayoutAccountRead, PayoutRead

router = APIRouter(tags=["providers"], responses=ERROR_RESPONSES)
STRICT_QUERY = [reject_unknown_query()]


def _ts(value) -> int:  # type: ignore[no-untyped-def]
    return int(value.timestamp())


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
        await call_stripe(request.app.state, gateway, account_row)
    link_row = await caller.run(payouts.link_call, settings=settings)
    await call_stripe(request.app.state, gateway, link_row)
    onboarding = await caller.run(payouts.onboarding, link_row_id=link_row)
    return payout_account_read(onboarding.account, onboarding.url)

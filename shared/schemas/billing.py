"""The billing API's shapes: balance, usage, ledger transactions, top-ups, and providers' earnings and payout
account. Amounts are USD decimal strings with six places (micro-dollars), like every price in the API."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

from pydantic import Field, field_validator

from shared.money import usd_to_micros
from shared.schemas.common import Page, Reply, Request


class BalanceRead(Reply):
    object: Literal["billing.balance"] = "billing.balance"
    currency: Literal["usd"] = "usd"
    available: str = Field(description="Credit free to spend (negative if usage ran past the holds)")
    held: str = Field(description="Set aside for queued and running jobs")
    topups_enabled: bool = Field(description="Whether this coordinator takes top-ups through Stripe")


class UsageRead(Reply):
    object: Literal["billing.usage"] = "billing.usage"
    job_id: str | None = None
    date: str | None = Field(default=None, description="UTC day (YYYY-MM-DD) the leases ended")
    gpu_class: str
    price_per_gpu_hour: str
    leases: int
    seconds: int = Field(description="Billed seconds")
    cost: str


class UsageList(Reply):
    object: Literal["list"] = "list"
    group_by: Literal["job", "day"]
    data: list[UsageRead]


class TransactionRead(Reply):
    object: Literal["billing.transaction"] = "billing.transaction"
    id: str
    type: str = Field(description="grant, topup, hold, release, settle, payout, payout_failed, payout_reversed, refund")
    created_at: int
    description: str
    available: str = Field(description="What it did to your available balance")
    held: str = Field(description="What it did to your held balance")
    payable: str = Field(description="What it did to your payable earnings (providers)")
    job_id: str | None
    lease_id: str | None


class TransactionList(Page):
    data: list[TransactionRead]


Usd = Annotated[Decimal, Field(gt=0, le=1_000_000)]


class TopupCreate(Request):
    amount: Usd = Field(description="USD to add, whole cents, $5 to $10,000")

    @field_validator("amount")
    @classmethod
    def _six_places(cls, value: Decimal) -> Decimal:
        usd_to_micros(value)
        return value


class TopupRead(Reply):
    object: Literal["billing.topup"] = "billing.topup"
    id: str
    amount: str
    status: Literal["pending", "paid", "expired", "failed"]
    checkout_url: str | None = Field(description="Stripe Checkout page that takes the payment")
    created_at: int


class TopupList(Page):
    data: list[TopupRead]


class PayoutRead(Reply):
    object: Literal["payout"] = "payout"
    id: str
    amount: str
    status: Literal["pending", "paid", "failed", "reversed"]
    destination: str
    stripe_transfer_id: str | None
    failure: str | None
    created_at: int


class PayoutAccountRead(Reply):
    object: Literal["payout_account"] = "payout_account"
    stripe_account_id: str
    payouts_enabled: bool
    details_submitted: bool
    onboarding_url: str | None = Field(default=None, description="Stripe's onboarding page (a fresh link each call)")


class EarningsRead(Reply):
    object: Literal["provider.earnings"] = "provider.earnings"
    currency: Literal["usd"] = "usd"
    payable: str = Field(description="Earned and not yet paid out")
    pending_payouts: str = Field(description="In transfers Stripe has not confirmed yet")
    paid_out: str
    lifetime_earned: str
    minimum_payout: str
    payouts_enabled: bool = Field(description="A Stripe key is configured and your payout account can receive")
    payout_account: PayoutAccountRead | None
    payouts: list[PayoutRead]

"""Provider payouts through Stripe Connect: a provider onboards a Connect account, and on a schedule (Celery
beat) every provider whose payable earnings reach the minimum is paid by a Transfer to that account.

A payout debits the provider's payable balance and queues the transfer in the same commit (ledger and outbox
together); Stripe makes the transfer once whatever crashes in between (idempotency key `payout-<id>`). A
transfer Stripe refuses, or later reverses, puts the amount back. Stripe moves whole cents: a payout is the
payable balance rounded down to a cent, and the sub-cent rest waits for the next one. Without a Stripe key,
payouts stay pending: earnings accrue as payable and nothing is sent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.db.ids import new_id
from coordinator.db.tables import (
    AccountModel, Book, LedgerBalanceModel, OutboxModel, OutboxStatus, PayoutAccountModel, PayoutModel, PayoutStatus,
    UsageRecordModel, utcnow,
)
from coordinator.services import ledger, outbox
from coordinator.services.ledger import HOUSE
from coordinator.settings import CoordinatorSettings
from coordinator.stripe_gateway import StripeGateway, StripeRefused, payments_not_configured
from shared.errors import BadGateway, InvalidRequest
from shared.money import MICROS_PER_CENT

log = logging.getLogger(__name__)
PAYOUT_BATCH = 500


# --- the payout account (Connect onboarding) ------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Onboarding:
    account: PayoutAccountModel
    url: str


def account_call(*, session: Session, account: AccountModel, gateway: StripeGateway | None) -> str | None:
    """The outbox row that creates the provider's Connect account, if it has none yet (made once per provider:
    its idempotency key is the provider's id). The caller sends it."""
    if gateway is None:
        raise payments_not_configured()
    if session.get(PayoutAccountModel, account.id) is not None:
        session.commit()
        return None
    key = f"account-{account.id}"
    row = session.scalars(select(OutboxModel).where(OutboxModel.idempotency_key == key)).first()
    if row is None:
        row = outbox.enqueue(session=session, operation="account.create", key=key, subject_id=account.id, params={
            "type": "express", "capabilities": {"transfers": {"requested": True}},
            "metadata": {"tunegrid_account_id": account.id}})
    row_id = row.id
    session.commit()
    return row_id


def link_call(*, session: Session, account: AccountModel, settings: CoordinatorSettings) -> str:
    """After `account_call`: the outbox row for a fresh onboarding link (the caller sends it)."""
    payout_account = session.get(PayoutAccountModel, account.id)
    if payout_account is None:
        row = session.scalars(select(OutboxModel).where(OutboxModel.idempotency_key == f"account-{account.id}")).first()
        if row is not None and row.status is OutboxStatus.failed:
            raise InvalidRequest(f"Stripe refused to create a payout account: {row.last_error}",
                                 code="payout_account_refused")
        raise BadGateway("Stripe did not create the payout account in time; nothing is lost, retry.")
    base = settings.public_url.rstrip("/")
    row = outbox.enqueue(session=session, operation="account_link.create", key=f"account-link-{new_id('al-')}",
                         subject_id=account.id, params={
                             "account": payout_account.stripe_account_id, "type": "account_onboarding",
                             "refresh_url": f"{base}/providers/payout-account?result=refresh",
                             "return_url": f"{base}/providers/payout-account?result=done"})
    row_id = row.id
    session.commit()
    return row_id


def onboarding(*, session: Session, account: AccountModel, link_row_id: str) -> Onboarding:
    link = session.get(OutboxModel, link_row_id)
    payout_account = session.get(PayoutAccountModel, account.id)
    assert link is not None and payout_account is not None and link.subject_id == account.id
    session.commit()
    if link.response is None:
        raise BadGateway("Stripe did not return an onboarding link in time; retry.")
    return Onboarding(account=payout_account, url=link.response["url"])


def on_account(*, session: Session, row, result, refused: StripeRefused | None) -> None:  # type: ignore[no-untyped-def]
    if result is None:
        log.error("Stripe refused a Connect account for %s: %s", row.subject_id, refused)
        return
    if session.get(PayoutAccountModel, row.subject_id) is None:
        session.add(PayoutAccountModel(account_id=row.subject_id, stripe_account_id=result["id"],
                                       payouts_enabled=bool(result.get("payouts_enabled")),
                                       details_submitted=bool(result.get("details_submitted"))))


def account_updated(*, session: Session, stripe_account: dict) -> str:  # type: ignore[type-arg]
    """`account.updated` from a verified webhook: onboarding finished (or Stripe disabled payouts)."""
    row = session.scalars(select(PayoutAccountModel).where(
        PayoutAccountModel.stripe_account_id == stripe_account["id"]).with_for_update()).first()
    if row is None:
        return "unknown account"
    capabilities = stripe_account.get("capabilities") or {}
    row.payouts_enabled = bool(stripe_account.get("payouts_enabled")) and capabilities.get("transfers", "active") == "active"
    row.details_submitted = bool(stripe_account.get("details_submitted"))
    return "updated"


# --- paying out -----------------------------------------------------------------------------------

def create_payouts(*, session: Session, settings: CoordinatorSettings) -> list[str]:
    """For every onboarded provider with enough payable earnings: debit them and queue the transfer. The
    outbox ids to send."""
    if not settings.stripe_enabled:
        return []  # payouts stay pending: earnings accrue as payable
    candidates = list(session.execute(
        select(LedgerBalanceModel.owner_id, PayoutAccountModel.stripe_account_id)
        .join(PayoutAccountModel, PayoutAccountModel.account_id == LedgerBalanceModel.owner_id)
        .where(LedgerBalanceModel.book == Book.provider_payable, LedgerBalanceModel.balance >= settings.min_payout,
               PayoutAccountModel.payouts_enabled.is_(True))
        .order_by(LedgerBalanceModel.owner_id).limit(PAYOUT_BATCH)))
    session.commit()
    queued = []
    for provider_id, destination in candidates:
        payable = ledger.balance(session, Book.provider_payable, provider_id, for_update=True)
        amount = payable - payable % MICROS_PER_CENT
        if amount < settings.min_payout:
            session.rollback()
            continue
        payout = PayoutModel(id=new_id("payout-"), account_id=provider_id, amount=amount, status=PayoutStatus.pending,
                             destination=destination)
        session.add(payout)
        ledger.move(session=session, key=f"payout:{payout.id}", kind="payout", amount=amount,
                    frm=(Book.provider_payable, provider_id), to=(Book.stripe_clearing, HOUSE),
                    description=f"Payout {payout.id} to Stripe account {destination}", account_id=provider_id)
        row = outbox.enqueue(session=session, operation="transfer.create", key=f"payout-{payout.id}",
                             subject_id=payout.id, params={
                                 "amount": amount // MICROS_PER_CENT, "currency": "usd", "destination": destination,
                                 "transfer_group": payout.id,
                                 "metadata": {"tunegrid_payout_id": payout.id, "tunegrid_account_id": provider_id}})
        session.commit()
        queued.append(row.id)
    return queued


def _restore(session: Session, payout: PayoutModel, *, status: PayoutStatus, why: str) -> None:
    ledger.move(session=session, key=f"payout-{status.value}:{payout.id}", kind=f"payout_{status.value}",
                amount=payout.amount, frm=(Book.stripe_clearing, HOUSE), to=(Book.provider_payable, payout.account_id),
                description=f"Payout {payout.id} {status.value}: {why}; the amount is payable again",
                account_id=payout.account_id)
    payout.status, payout.failure = status, why


def on_transfer(*, session: Session, row, result, refused: StripeRefused | None) -> None:  # type: ignore[no-untyped-def]
    payout = session.get(PayoutModel, row.subject_id, with_for_update=True)
    if payout is None or payout.status is not PayoutStatus.pending:
        return
    if result is not None:
        payout.status, payout.stripe_transfer_id, payout.sent_at = PayoutStatus.paid, result["id"], utcnow()
    else:
        _restore(session, payout, status=PayoutStatus.failed, why=str(refused))


def transfer_reversed(*, session: Session, transfer: dict) -> str:  # type: ignore[type-arg]
    payout = session.scalars(select(PayoutModel).where(
        PayoutModel.stripe_transfer_id == transfer["id"]).with_for_update()).first()
    if payout is None or payout.status is not PayoutStatus.paid:
        return "ignored"
    _restore(session, payout, status=PayoutStatus.reversed, why="Stripe reversed the transfer")
    return "reversed"


# --- what the provider sees -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Earnings:
    payable: int
    pending: int  # in payouts not yet confirmed by Stripe
    paid: int
    lifetime: int
    payouts: list[PayoutModel]
    payout_account: PayoutAccountModel | None


def earnings(*, session: Session, account: AccountModel, limit: int = 20) -> Earnings:
    if account.role.value not in ("provider", "admin"):
        raise InvalidRequest("Earnings are for provider accounts.", code="not_a_provider")
    sums = dict(session.execute(select(PayoutModel.status, func.coalesce(func.sum(PayoutModel.amount), 0))
                                .where(PayoutModel.account_id == account.id).group_by(PayoutModel.status)).all())
    lifetime = session.scalar(select(func.coalesce(func.sum(UsageRecordModel.provider_micros), 0))
                              .where(UsageRecordModel.provider_id == account.id)) or 0
    result = Earnings(
        payable=ledger.balance(session, Book.provider_payable, account.id),
        pending=int(sums.get(PayoutStatus.pending, 0)), paid=int(sums.get(PayoutStatus.paid, 0)),
        lifetime=int(lifetime),
        payouts=list(session.scalars(select(PayoutModel).where(PayoutModel.account_id == account.id)
                                     .order_by(PayoutModel.id.desc()).limit(limit))),
        payout_account=session.get(PayoutAccountModel, account.id),
    )
    session.commit()
    return result

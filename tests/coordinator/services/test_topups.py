"""`services/topups.py` on a real database: a top-up is whole cents from $5 to $10,000, needs Stripe configured,
and the same Idempotency-Key answers with the same top-up; until Stripe answers its Checkout call the top-up is
a 502 the customer can retry, a refusal a 400. (Stripe's answers and webhooks: test_stripe_sync.py.)"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel, OutboxModel, TopupStatus
from coordinator.services import topups
from coordinator.services.outbox import Answer
from coordinator.services.stripe_sync import record_answer
from coordinator.settings import CoordinatorSettings
from coordinator.stripe_gateway import StripeGateway, StripeRefused
from shared.errors import BadGateway, InvalidRequest
from shared.money import usd_to_micros


@pytest.fixture
def gateway(stripe_settings: CoordinatorSettings) -> StripeGateway:
    return StripeGateway(stripe_settings)  # made, never called here: these tests stop before Stripe is asked


def prepare(session: Session, account: AccountModel, settings: CoordinatorSettings, gateway: StripeGateway | None,
            usd: str, key: str | None = None) -> tuple[str, str | None]:
    return topups.prepare(session=session, account=account, amount=usd_to_micros(usd), request_key=key,
                          settings=settings, gateway=gateway)


@pytest.mark.parametrize("usd", ["4.99", "10000.01", "20.001", "0", "-5"])
def test_a_top_up_is_whole_cents_within_the_limits(session: Session, customer_account: AccountModel,
                                                   stripe_settings: CoordinatorSettings, gateway: StripeGateway, usd: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        prepare(session, customer_account, stripe_settings, gateway, usd)
    assert refused.value.code == "invalid_amount"
    assert session.scalar(select(func.count()).select_from(OutboxModel)) == 0


def test_without_stripe_there_are_no_top_ups(session: Session, customer_account: AccountModel,
                                             settings: CoordinatorSettings) -> None:
    with pytest.raises(InvalidRequest) as refused:
        prepare(session, customer_account, settings, None, "20")
    assert refused.value.code == "payments_not_configured"


def test_the_same_key_answers_with_the_same_top_up(session: Session, customer_account: AccountModel,
                                                   stripe_settings: CoordinatorSettings, gateway: StripeGateway) -> None:
    first, row = prepare(session, customer_account, stripe_settings, gateway, "20", key="k1")
    again, same_row = prepare(session, customer_account, stripe_settings, gateway, "20", key="k1")
    assert first == again and row == same_row and row is not None
    other, _ = prepare(session, customer_account, stripe_settings, gateway, "20", key="k2")
    assert other != first
    with pytest.raises(InvalidRequest) as reused:
        prepare(session, customer_account, stripe_settings, gateway, "25", key="k1")
    assert reused.value.code == "idempotency_key_reused"
    assert session.scalar(select(func.count()).select_from(OutboxModel)) == 2


def test_a_checkout_session_carries_the_amount_in_cents_and_the_ids(session: Session, customer_account: AccountModel,
                                                                    stripe_settings: CoordinatorSettings, gateway: StripeGateway) -> None:
    topup_id, row_id = prepare(session, customer_account, stripe_settings, gateway, "12.34")
    row = session.get(OutboxModel, row_id)
    assert row is not None and row.operation == "checkout.session.create" and row.idempotency_key == f"topup-{topup_id}"
    assert row.params["line_items"][0]["price_data"]["unit_amount"] == 1234
    assert row.params["metadata"] == {"tunegrid_topup_id": topup_id, "tunegrid_account_id": customer_account.id}


def test_an_unanswered_top_up_is_a_retryable_502_and_a_refused_one_a_400(
    session: Session, customer_account: AccountModel, stripe_settings: CoordinatorSettings, gateway: StripeGateway,
) -> None:
    topup_id, row_id = prepare(session, customer_account, stripe_settings, gateway, "20", key="k")
    with pytest.raises(BadGateway):
        topups.checked(session=session, account=customer_account, topup_id=topup_id)
    assert row_id is not None
    record_answer(session=session, row_id=row_id, answer=Answer(refused=StripeRefused("no", code="invalid_request")))
    with pytest.raises(InvalidRequest) as refused:
        topups.checked(session=session, account=customer_account, topup_id=topup_id)
    assert refused.value.code == "topup_refused"


def test_a_customer_lists_only_their_own_top_ups(session: Session, customer_account: AccountModel, make_caller,  # type: ignore[no-untyped-def]
                                                 stripe_settings: CoordinatorSettings, gateway: StripeGateway) -> None:
    mine, _ = prepare(session, customer_account, stripe_settings, gateway, "20")
    other = session.get(AccountModel, make_caller("customer", "bob").account_id)
    assert other is not None
    prepare(session, other, stripe_settings, gateway, "30")
    rows, has_more = topups.list_topups(session=session, account=customer_account, after=None, limit=10)
    assert [t.id for t in rows] == [mine] and not has_more and rows[0].status is TopupStatus.pending

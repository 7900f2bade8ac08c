"""The double-entry ledger: balanced transactions only, once per business key, balances equal to the sums of
their postings; and, property-based, random sequences of top-ups, grants, holds, settlements, cancels
(releases) and payouts never break those invariants nor let a hold overdraw a customer."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.db.models import Book, LedgerPostingModel, LedgerTransactionModel
from coordinator.services import ledger
from coordinator.services.ledger import HOUSE, Entry
from shared.errors import PaymentRequired


def test_an_unbalanced_transaction_is_refused(session: Session) -> None:
    with pytest.raises(ValueError, match="does not balance"):
        ledger.post(session=session, key="bad", kind="grant", description="x",
                    entries=[Entry(Book.customer_available, "acct-a", 5), Entry(Book.platform_grants, HOUSE, -4)])
    with pytest.raises(ValueError, match="needs owner"):
        Entry(Book.customer_available, HOUSE, 1)


def test_a_business_key_posts_once(session: Session) -> None:
    def grant() -> str | None:
        return ledger.move(session=session, key="grant:once", kind="grant", amount=7_000_000,
                           frm=(Book.platform_grants, HOUSE), to=(Book.customer_available, "acct-a"), description="x")

    assert grant() is not None
    session.commit()
    assert grant() is None
    session.commit()
    assert ledger.balance(session, Book.customer_available, "acct-a") == 7_000_000
    assert ledger.balance(session, Book.platform_grants) == -7_000_000
    assert session.scalar(select(func.count()).select_from(LedgerTransactionModel)) == 1
    assert session.scalar(select(func.count()).select_from(LedgerPostingModel)) == 2


def test_require_available_refuses_an_overdraft_with_402(session: Session) -> None:
    with pytest.raises(PaymentRequired) as refused:
        ledger.require_available(session, "acct-nobody", 1, purpose="a test")
    assert refused.value.http_status == 402 and "Insufficient balance" in refused.value.message


def test_the_audit_notices_a_drifted_balance(session: Session) -> None:
    ledger.move(session=session, key="k", kind="grant", amount=5, frm=(Book.platform_grants, HOUSE),
                to=(Book.customer_available, "acct-a"), description="x")
    session.commit()
    assert ledger.audit(session).ok
    from coordinator.db.models import LedgerBalanceModel  # noqa: PLC0415

    row = session.get(LedgerBalanceModel, (Book.customer_available, "acct-a"))
    assert row is not None
    row.balance += 1
    session.commit()
    assert ledger.audit(session).drifted_balances == [("customer_available", "acct-a", 6, 5)]


# --- properties -----------------------------------------------------------------------------------

CUSTOMERS = ("c1", "c2")
PROVIDERS = ("p1", "p2")
amounts = st.integers(min_value=1, max_value=50_000_000)
operations = st.lists(st.one_of(
    st.tuples(st.just("topup"), st.sampled_from(CUSTOMERS), amounts),
    st.tuples(st.just("grant"), st.sampled_from(CUSTOMERS), amounts),
    st.tuples(st.just("hold"), st.sampled_from(CUSTOMERS), amounts),
    st.tuples(st.just("settle"), st.sampled_from(CUSTOMERS), amounts, st.sampled_from(PROVIDERS), st.integers(0, 5000)),
    st.tuples(st.just("release"), st.sampled_from(CUSTOMERS)),
    st.tuples(st.just("payout"), st.sampled_from(PROVIDERS)),
    st.tuples(st.just("replay"), st.integers(min_value=0, max_value=1000)),
), min_size=1, max_size=25)
_run = itertools.count()


def _apply(session: Session, run: str, ops: list[tuple]) -> dict[tuple[Book, str], int]:  # type: ignore[type-arg]
    """Carry out `ops` through the ledger (the way billing and payouts use it) and keep a model of the books."""
    model: dict[tuple[Book, str], int] = {}
    posted: list[tuple[str, list[Entry]]] = []

    def post(key: str, kind: str, entries: list[Entry]) -> None:
        if ledger.post(session=session, key=key, kind=kind, entries=entries, description=kind) is not None:
            for e in entries:
                model[(e.book, e.owner)] = model.get((e.book, e.owner), 0) + e.amount
        posted.append((key, entries))

    for i, op in enumerate(ops):
        key = f"{run}:{i}"
        kind = op[0]
        if kind in ("topup", "grant"):
            _, who, amount = op
            source = Book.stripe_clearing if kind == "topup" else Book.platform_grants
            post(key, kind, [Entry(source, HOUSE, -amount), Entry(Book.customer_available, f"{run}{who}", amount)])
        elif kind == "hold":
            _, who, amount = op
            try:
                ledger.require_available(session, f"{run}{who}", amount, purpose="a job")
            except PaymentRequired:
                assert model.get((Book.customer_available, f"{run}{who}"), 0) < amount
                continue
            post(key, kind, [Entry(Book.customer_available, f"{run}{who}", -amount),
                             Entry(Book.customer_held, f"{run}{who}", amount)])
        elif kind == "settle":
            _, who, charge, provider, fee_bps = op
            held = model.get((Book.customer_held, f"{run}{who}"), 0)
            from_held = min(charge, held)
            earned = charge * 10_000 // (10_000 + fee_bps)
            post(key, kind, [Entry(Book.customer_held, f"{run}{who}", -from_held),
                             Entry(Book.customer_available, f"{run}{who}", -(charge - from_held)),
                             Entry(Book.provider_payable, f"{run}{provider}", earned),
                             Entry(Book.platform_revenue, HOUSE, charge - earned)])
        elif kind == "release":
            held = model.get((Book.customer_held, f"{run}{op[1]}"), 0)
            post(key, kind, [Entry(Book.customer_held, f"{run}{op[1]}", -held),
                             Entry(Book.customer_available, f"{run}{op[1]}", held)])
        elif kind == "payout":
            payable = ledger.balance(session, Book.provider_payable, f"{run}{op[1]}", for_update=True)
            post(key, kind, [Entry(Book.provider_payable, f"{run}{op[1]}", -payable),
                             Entry(Book.stripe_clearing, HOUSE, payable)])
        elif kind == "replay" and posted:  # a retried settlement, top-up, ...: the same key again
            again_key, entries = posted[op[1] % len(posted)]
            assert ledger.post(session=session, key=again_key, kind="replay", entries=entries, description="x") is None
        session.commit()
    return model


@given(ops=operations)
@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_sequences_keep_the_ledger_balanced(session: Session, ops: list[tuple]) -> None:  # type: ignore[type-arg]
    run = f"r{next(_run)}-"
    model = _apply(session, run, ops)
    for (book, owner), expected in model.items():
        if owner:  # kept balances equal both the model and the postings' sum
            assert ledger.balance(session, book, owner) == expected == ledger.sum_of_postings(session, book, owner)
    for who in CUSTOMERS:
        assert ledger.balance(session, Book.customer_held, f"{run}{who}") >= 0
    for provider in PROVIDERS:
        assert ledger.balance(session, Book.provider_payable, f"{run}{provider}") >= 0
    result = ledger.audit(session)
    assert result.ok, result

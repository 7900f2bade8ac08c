"""The double-entry ledger: balanced transactions only, once per business key, balances equal to the sums of
their postings; and, property-based, random sequences of top-ups, grants, holds, settlements, cancels
(releases) and payouts never break those invariants nor let a hold overdraw a customer."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from coordinator.db.tables import Book, LedgerPostingModel, LedgerTransactionModel
from coordinator.services import ledger
from coordinator.services.ledger import HOUSE, Entry, LockOrderError
from shared.errors import InsufficientQuota
from tests.conftest import truncate_all


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


def test_require_available_refuses_an_overdraft_with_429_insufficient_quota(session: Session) -> None:
    with pytest.raises(InsufficientQuota) as refused:
        ledger.require_available(session, "acct-nobody", 1, purpose="a test")
    assert refused.value.http_status == 429 and "Insufficient balance" in refused.value.message


def test_the_audit_notices_a_drifted_balance(session: Session) -> None:
    ledger.move(session=session, key="k", kind="grant", amount=5, frm=(Book.platform_grants, HOUSE),
                to=(Book.customer_available, "acct-a"), description="x")
    session.commit()
    assert ledger.audit(session).ok
    from coordinator.db.tables import LedgerBalanceModel  # noqa: PLC0415

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
            except InsufficientQuota:
                assert model.get((Book.customer_available, f"{run}{who}"), 0) < amount
                session.rollback()  # a refused hold ends its transaction, as every caller's does
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


# --- lock order -----------------------------------------------------------------------------------

def _settle(session: Session, customer: str, provider: str, charge: int) -> None:
    """What `billing.settle` posts when the hold covers the charge: held and payable, no available."""
    ledger.post(session=session, key=f"settle:{customer}:{time.monotonic_ns()}", kind="settle", description="x",
                entries=[Entry(Book.customer_held, customer, -charge), Entry(Book.provider_payable, provider, charge - 1),
                         Entry(Book.platform_revenue, HOUSE, 1)])


def _release(session: Session, customer: str, amount: int) -> None:
    ledger.move(session=session, key=f"release:{customer}:{time.monotonic_ns()}", kind="release", amount=amount,
                frm=(Book.customer_held, customer), to=(Book.customer_available, customer), description="x")


def _hold(session: Session, customer: str, amount: int) -> None:
    ledger.require_available(session, customer, amount, purpose="a job")
    ledger.move(session=session, key=f"hold:{customer}:{time.monotonic_ns()}", kind="hold", amount=amount,
                frm=(Book.customer_available, customer), to=(Book.customer_held, customer), description="x")


def test_a_transaction_asking_for_books_out_of_order_is_refused(session: Session) -> None:
    _settle(session, "acct-b", "acct-p", 10)  # takes b's books, then p's payable
    with pytest.raises(LockOrderError):  # a customer sorting before them, in the same transaction
        ledger.balance(session, Book.customer_available, "acct-a", for_update=True)
    session.rollback()
    _settle(session, "acct-c", "acct-p", 10)
    _release(session, "acct-c", 5)  # held, then available: the customer's books were taken together at first touch
    ledger.require_available(session, "acct-c", 0, purpose="a job")
    session.commit()
    ledger.balance(session, Book.customer_available, "acct-a", for_update=True)  # a new transaction starts afresh
    session.commit()


def test_a_settlement_and_a_hold_of_one_customer_at_once_do_not_deadlock(postgres_url: str) -> None:
    """The deadlock CI hit with 50 workers of one provider and one customer (PostgreSQL only; SQLite has one
    writer): a settlement locked held then (releasing) available, while a hold locked available then held.
    The settlement waits here until the hold is queued behind it, then releases."""
    engine = create_engine(postgres_url, connect_args={"connect_timeout": 5})
    sessions = sessionmaker(engine, expire_on_commit=False)
    customer, provider = "acct-lock-c", "acct-lock-p"
    try:
        with sessions() as setup:
            ledger.move(session=setup, key="grant:lock-test", kind="grant", amount=1_000, frm=(Book.platform_grants, HOUSE),
                        to=(Book.customer_available, customer), description="x")
            _hold(setup, customer, 500)
            setup.commit()
        failures: list[BaseException] = []
        with engine.connect() as settling, engine.connect() as holding, engine.connect() as watcher, \
                Session(bind=settling, expire_on_commit=False) as settler, \
                Session(bind=holding, expire_on_commit=False) as holder:
            holder_pid = holding.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            holding.commit()
            _settle(settler, customer, provider, 100)

            def hold() -> None:
                try:
                    _hold(holder, customer, 200)
                    holder.commit()
                except BaseException as exc:  # noqa: BLE001 - reported below
                    failures.append(exc)
                    holder.rollback()

            thread = threading.Thread(target=hold)
            thread.start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the hold is waiting on a lock the settlement holds
                waiting = watcher.scalar(text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid"),
                                         {"pid": holder_pid})
                watcher.commit()
                if waiting == "Lock":
                    break
                time.sleep(0.01)
            else:
                settler.rollback()
                thread.join(timeout=30)
                pytest.fail("the hold never waited for the settlement's lock")
            try:
                _release(settler, customer, 400)
                settler.commit()
            except OperationalError as exc:
                failures.append(exc)
                settler.rollback()
            thread.join(timeout=30)
        assert not failures, failures
        with sessions() as check:
            assert ledger.balance(check, Book.customer_available, customer) == 500 + 400 - 200
            assert ledger.balance(check, Book.customer_held, customer) == 200
            assert ledger.audit(check).ok
    finally:
        engine.dispose()
        truncate_all(postgres_url)

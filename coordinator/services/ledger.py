"""The double-entry ledger: the one place money moves.

Every movement is a transaction of postings that sum to zero, posted at most once per business key
(`settle:<lease id>`, `topup:<checkout session id>`, ...): posting the same key again changes nothing and
returns None. Balances are sums of postings. The books that belong to someone (a customer's available and
held credit, a provider's payable earnings) also keep that sum in `ledger_balances`, updated in the same
transaction, so a hold can lock and check it; the house books (revenue, grants, Stripe clearing, refunds)
are summed when read, so concurrent settlements never queue on one hot row.

Locks: a transaction that moves money locks the kept balances it touches in one global order, (book, owner)
sorted, before it changes any: a customer's books are taken together (available, then held) at the first
touch of either, and a provider's payable after them. Otherwise a settlement (held, then available on release)
and a hold (available, then held) of one customer deadlock. `lock_balances` takes them; asking for a row that
sorts before one the transaction already holds is a programming error (`LockOrderError`), raised on SQLite
as on PostgreSQL so the tests find it: one transaction moves money for one job.

Signs: a customer's or provider's balance is positive when we owe them; money that came in through Stripe
makes `stripe_clearing` negative, money paid out brings it back. Across all books the total is always zero.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from sqlalchemy import TextClause, func, insert, select, text
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session, SessionTransaction

from coordinator.db.ids import new_id
from coordinator.db.tables import (
    OWNED_BOOKS, Book, LedgerBalanceModel, LedgerPostingModel, LedgerTransactionModel, utcnow,
)
from coordinator.metrics import LEDGER_POSTINGS, LEDGER_TRANSACTIONS, count_on_commit
from shared.errors import InsufficientQuota
from shared.money import micros_to_usd

HOUSE = ""  # the owner id of the house books
CUSTOMER_BOOKS = (Book.customer_available, Book.customer_held)  # locked together, in this order


class LockOrderError(RuntimeError):
    """A transaction asked for a kept balance that sorts before one it already holds (see the module's Locks)."""


@dataclass(slots=True)
class _Locks:
    transaction: SessionTransaction
    held: set[tuple[str, str]] = field(default_factory=set)


_LOCKS = "tunegrid.ledger_locks"


def _locks(session: Session) -> _Locks:
    session.connection()  # begins the transaction if none has begun
    transaction = session.get_transaction()
    assert transaction is not None
    state = session.info.get(_LOCKS)
    if state is None or state.transaction is not transaction:
        state = session.info[_LOCKS] = _Locks(transaction)
    return state


@lru_cache(maxsize=16)
def _lock_statement(rows: int) -> TextClause:
    """Lock kept balances in the given (sorted) order, creating missing ones at zero; an existing row is locked
    by `DO UPDATE ... WHERE false` without being written."""
    values = ", ".join(f"(:b{i}, :o{i})" for i in range(rows))
    return text(f"""
        INSERT INTO ledger_balances (book, owner_id, balance, updated_at)
        SELECT v.book, v.owner_id, 0, :now FROM (VALUES {values}) AS v(book, owner_id) ORDER BY v.book, v.owner_id
        ON CONFLICT (book, owner_id) DO UPDATE SET balance = ledger_balances.balance WHERE false""")


def lock_balances(session: Session, books: Iterable[tuple[Book, str]]) -> None:
    """Lock these owned books' kept balances for the rest of the transaction, in the global order (a customer's
    two books together); rows it holds already are not asked for again."""
    state = _locks(session)
    wanted: set[tuple[str, str]] = set()
    for book, owner in books:
        if book not in OWNED_BOOKS:
            continue
        wanted.update((b.value, owner) for b in (CUSTOMER_BOOKS if book in CUSTOMER_BOOKS else (book,)))
    new = sorted(wanted - state.held)
    if not new:
        return
    if state.held and new[0] < max(state.held):
        raise LockOrderError(f"ledger lock order: {new[0]} asked for after {max(state.held)} in one transaction")
    if session.get_bind().dialect.name == "postgresql":  # SQLite's one writer needs no row locks
        params: dict[str, Any] = {"now": utcnow()}
        for i, (book, owner) in enumerate(new):
            params[f"b{i}"], params[f"o{i}"] = book, owner
        with session.no_autoflush:
            session.execute(_lock_statement(len(new)), params)
    state.held.update(new)


@dataclass(frozen=True, slots=True)
class Entry:
    book: Book
    owner: str
    amount: int  # Micros, signed

    def __post_init__(self) -> None:
        if (self.book in OWNED_BOOKS) != bool(self.owner):
            raise ValueError(f"{self.book.value} {'needs' if self.book in OWNED_BOOKS else 'takes no'} owner")


@lru_cache(maxsize=64)
def _postgresql_statement(postings: int, balances: int) -> TextClause:
    """The whole transaction in one round trip: the transaction row (nothing else if its key exists), its
    postings, and the kept balances upserted in key order."""
    values = ", ".join(f"(:b{i}, :o{i}, CAST(:a{i} AS BIGINT))" for i in range(postings))
    sql = f"""
        WITH txn AS (
            INSERT INTO ledger_transactions (id, business_key, kind, account_id, job_id, lease_id, description, created_at)
            VALUES (:id, :business_key, :kind, :account_id, :job_id, :lease_id, :description, :created_at)
            ON CONFLICT (business_key) DO NOTHING RETURNING id
        ), postings AS (
            INSERT INTO ledger_postings (transaction_id, book, owner_id, amount)
            SELECT txn.id, v.book, v.owner_id, v.amount FROM txn CROSS JOIN (VALUES {values}) AS v(book, owner_id, amount)
            RETURNING 1
        )"""
    if balances:
        kept = ", ".join(f"(:kb{i}, :ko{i}, CAST(:ka{i} AS BIGINT))" for i in range(balances))
        sql += f""", balances AS (
            INSERT INTO ledger_balances (book, owner_id, balance, updated_at)
            SELECT v.book, v.owner_id, v.amount, :created_at FROM txn CROSS JOIN (VALUES {kept}) AS v(book, owner_id, amount)
            ORDER BY v.book, v.owner_id
            ON CONFLICT (book, owner_id) DO UPDATE
            SET balance = ledger_balances.balance + EXCLUDED.balance, updated_at = EXCLUDED.updated_at
            RETURNING 1
        )"""
    return text(sql + " SELECT id FROM txn")


def _post_postgresql(session: Session, row: dict[str, Any], entries: list[Entry],
                     balances: list[tuple[Book, str, int]]) -> str | None:
    params = dict(row)
    for i, e in enumerate(entries):
        params[f"b{i}"], params[f"o{i}"], params[f"a{i}"] = e.book.value, e.owner, e.amount
    for i, (book, owner, delta) in enumerate(balances):
        params[f"kb{i}"], params[f"ko{i}"], params[f"ka{i}"] = book.value, owner, delta
    return session.execute(_postgresql_statement(len(entries), len(balances)), params).scalar()


def post(
    *, session: Session, key: str, kind: str, entries: list[Entry], description: str, account_id: str | None = None,
    job_id: str | None = None, lease_id: str | None = None,
) -> str | None:
    """Post one balanced transaction under `key`; its id, or None if that key was posted before.

    The caller commits: the postings land with whatever state change they pay for, or not at all.
    """
    entries = [e for e in entries if e.amount != 0]
    if sum(e.amount for e in entries) != 0:
        raise ValueError(f"transaction {key} does not balance: {entries}")
    if not entries:
        return None
    txn_id = new_id("ltx-")
    deltas: dict[tuple[Book, str], int] = defaultdict(int)
    for e in entries:
        if e.book in OWNED_BOOKS:
            deltas[(e.book, e.owner)] += e.amount
    balances = sorted((book, owner, delta) for (book, owner), delta in deltas.items())
    lock_balances(session, [(book, owner) for book, owner, _ in balances])
    row = {"id": txn_id, "business_key": key, "kind": kind, "account_id": account_id, "job_id": job_id,
           "lease_id": lease_id, "description": description, "created_at": utcnow()}
    # The ledger's statements read and write only ledger tables: the caller's pending changes need not be
    # flushed first (they go with the commit, in one flush).
    with session.no_autoflush:
        if session.get_bind().dialect.name == "postgresql":
            posted = _post_postgresql(session, row, entries, balances)
        else:
            posted = _post_sqlite(session, row, entries, balances)
    if posted is not None:
        count_on_commit(session, LEDGER_TRANSACTIONS, kind=kind)
        count_on_commit(session, LEDGER_POSTINGS, len(entries))
    return posted


def _post_sqlite(session: Session, row: dict[str, Any], entries: list[Entry],
                 balances: list[tuple[Book, str, int]]) -> str | None:
    txn_id = row["id"]
    statement = sqlite.insert(LedgerTransactionModel).values(**row).on_conflict_do_nothing(
        index_elements=["business_key"]).returning(LedgerTransactionModel.id)
    if session.execute(statement).scalar() is None:
        return None
    session.execute(insert(LedgerPostingModel), [
        {"transaction_id": txn_id, "book": e.book, "owner_id": e.owner, "amount": e.amount} for e in entries
    ])
    upsert = sqlite.insert(LedgerBalanceModel)
    for book, owner, delta in balances:
        statement = upsert.values(book=book, owner_id=owner, balance=delta, updated_at=row["created_at"])
        session.execute(statement.on_conflict_do_update(
            index_elements=["book", "owner_id"],
            set_={"balance": LedgerBalanceModel.balance + statement.excluded.balance, "updated_at": row["created_at"]},
        ))
    return txn_id


def balance(session: Session, book: Book, owner: str = HOUSE, *, for_update: bool = False) -> int:
    """A book's balance: the kept sum for an owned book (locked with `for_update`), the postings' sum otherwise."""
    if book in OWNED_BOOKS:
        if for_update:
            lock_balances(session, [(book, owner)])
        return session.scalar(select(LedgerBalanceModel.balance).where(
            LedgerBalanceModel.book == book, LedgerBalanceModel.owner_id == owner)) or 0
    return sum_of_postings(session, book, owner)


def sum_of_postings(session: Session, book: Book, owner: str = HOUSE) -> int:
    return int(session.scalar(select(func.coalesce(func.sum(LedgerPostingModel.amount), 0)).where(
        LedgerPostingModel.book == book, LedgerPostingModel.owner_id == owner)) or 0)


def require_available(session: Session, customer_id: str, amount: int, *, purpose: str) -> int:
    """Lock the customer's available balance and check it covers `amount`; the balance, or 429
    (`InsufficientQuota`)."""
    available = balance(session, Book.customer_available, customer_id, for_update=True)
    if available < amount:
        raise InsufficientQuota(
            f"Insufficient balance: {purpose} needs ${micros_to_usd(amount)} and your available balance is "
            f"${micros_to_usd(available)}. Top up (POST /v1/billing/topups) and try again.")
    return available


def move(
    *, session: Session, key: str, kind: str, amount: int, frm: tuple[Book, str], to: tuple[Book, str],
    description: str, account_id: str | None = None, job_id: str | None = None, lease_id: str | None = None,
) -> str | None:
    """A two-posting transaction: `amount` leaves `frm` and arrives in `to`."""
    return post(session=session, key=key, kind=kind, description=description, account_id=account_id, job_id=job_id,
                lease_id=lease_id, entries=[Entry(*frm, -amount), Entry(*to, amount)])


@dataclass(frozen=True, slots=True)
class Audit:
    total: int  # of every posting: always 0
    unbalanced_transactions: int
    drifted_balances: list[tuple[str, str, int, int]]  # (book, owner, kept, summed)

    @property
    def ok(self) -> bool:
        return self.total == 0 and self.unbalanced_transactions == 0 and not self.drifted_balances


def audit(session: Session) -> Audit:
    """Check the ledger's invariants from scratch: postings sum to zero overall and per transaction, and every
    kept balance equals the sum of its postings."""
    total = int(session.scalar(select(func.coalesce(func.sum(LedgerPostingModel.amount), 0))) or 0)
    unbalanced = session.scalar(select(func.count()).select_from(
        select(LedgerPostingModel.transaction_id).group_by(LedgerPostingModel.transaction_id)
        .having(func.sum(LedgerPostingModel.amount) != 0).subquery()))
    summed = {(book, owner): int(amount) for book, owner, amount in session.execute(
        select(LedgerPostingModel.book, LedgerPostingModel.owner_id, func.sum(LedgerPostingModel.amount))
        .where(LedgerPostingModel.book.in_(OWNED_BOOKS))
        .group_by(LedgerPostingModel.book, LedgerPostingModel.owner_id))}
    kept = {(row.book, row.owner_id): row.balance for row in session.scalars(select(LedgerBalanceModel))}
    drifted = [(book.value, owner, kept.get((book, owner), 0), summed.get((book, owner), 0))
               for book, owner in sorted(set(summed) | set(kept))
               if kept.get((book, owner), 0) != summed.get((book, owner), 0)]
    return Audit(total=total, unbalanced_transactions=int(unbalanced or 0), drifted_balances=drifted)

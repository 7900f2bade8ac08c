"""What the dashboard shows, read only: costs and revenue over a period, the fleet, jobs and one job in full,
each a few indexed queries that stay fast with thousands of workers and jobs. (An admin's refund is a ledger
transaction: `billing.refund_job`.)"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, exists, func, or_, select
from sqlalchemy.orm import Session

from coordinator.db.tables import (
    AccountModel, Book, JobCheckpointModel, JobEventModel, JobModel, JobStatus, LeaseModel, LedgerBalanceModel,
    LedgerTransactionModel, PayoutModel, PayoutStatus, UsageRecordModel, WorkerModel, WorkerState, utcnow,
)
from coordinator.services import billing, evaluations, ledger
from shared.errors import InvalidRequest, NotFound

PAGE_SIZE = 50
TOP = 50


# --- costs ------------------------------------------------------------------------------------------

@dataclass
class Costs:
    start: date
    end: date
    days: list[dict[str, Any]]  # day, spend, fee, earned, seconds
    customers: list[dict[str, Any]]
    jobs: list[dict[str, Any]]
    gpu_classes: list[dict[str, Any]]
    spend: int = 0
    revenue: int = 0
    earned: int = 0
    paid_out: int = 0
    refunded: int = 0
    verification: int = 0  # what verifiers earned: the platform's cost of independent verification
    outstanding_holds: int = 0
    payable: int = 0


def costs(*, session: Session, start: date, end: date, account_id: str | None = None) -> Costs:
    """Spend per day, customer, job and GPU class between `start` and `end` (UTC days, inclusive); with
    `account_id`, one customer's own."""
    u = UsageRecordModel
    where = [u.usage_day >= start, u.usage_day <= end]
    if account_id is not None:
        where.append(u.customer_id == account_id)
    by_day = {row.day: row for row in session.execute(
        select(u.usage_day.label("day"), func.sum(u.charge_micros).label("spend"), func.sum(u.fee_micros).label("fee"),
               func.sum(u.provider_micros).label("earned"), func.sum(u.billable_seconds).label("seconds"))
        .where(*where).group_by(u.usage_day))}
    days = []
    for offset in range((end - start).days + 1):  # never past `end` (9999-12-31 has no next day)
        day = start + timedelta(days=offset)
        row = by_day.get(day)
        days.append({"day": day.isoformat(), "spend": int(row.spend) if row else 0, "fee": int(row.fee) if row else 0,
                     "earned": int(row.earned) if row else 0, "seconds": int(row.seconds) if row else 0})
    customers = [{"account_id": r.customer_id, "name": r.name, "spend": int(r.spend), "leases": int(r.leases),
                  "seconds": int(r.seconds)} for r in session.execute(
        select(u.customer_id, AccountModel.name, func.sum(u.charge_micros).label("spend"),
               func.count().label("leases"), func.sum(u.billable_seconds).label("seconds"))
        .join(AccountModel, AccountModel.id == u.customer_id).where(*where)
        .group_by(u.customer_id, AccountModel.name).order_by(func.sum(u.charge_micros).desc()).limit(TOP))]
    jobs = [{"job_id": r.job_id, "customer_id": r.customer_id, "model": r.model, "spend": int(r.spend),
             "seconds": int(r.seconds)} for r in session.execute(
        select(u.job_id, u.customer_id, JobModel.model, func.sum(u.charge_micros).label("spend"),
               func.sum(u.billable_seconds).label("seconds"))
        .join(JobModel, JobModel.id == u.job_id).where(*where)
        .group_by(u.job_id, u.customer_id, JobModel.model).order_by(func.sum(u.charge_micros).desc()).limit(TOP))]
    gpu_classes = [{"gpu_class": r.gpu_class, "spend": int(r.spend), "seconds": int(r.seconds), "leases": int(r.leases)}
                   for r in session.execute(
        select(u.gpu_class, func.sum(u.charge_micros).label("spend"), func.sum(u.billable_seconds).label("seconds"),
               func.count().label("leases"))
        .where(*where).group_by(u.gpu_class).order_by(func.sum(u.charge_micros).desc()))]
    report = Costs(start=start, end=end, days=days, customers=customers, jobs=jobs, gpu_classes=gpu_classes,
                   spend=sum(d["spend"] for d in days), revenue=sum(d["fee"] for d in days),
                   earned=sum(d["earned"] for d in days))
    since = datetime(start.year, start.month, start.day, tzinfo=utcnow().tzinfo)
    until = (datetime(end.year, end.month, end.day, tzinfo=utcnow().tzinfo) + timedelta(days=1) if end < date.max
             else datetime.max.replace(tzinfo=utcnow().tzinfo))
    if account_id is None:
        report.paid_out = int(session.scalar(select(func.coalesce(func.sum(PayoutModel.amount), 0)).where(
            PayoutModel.status == PayoutStatus.paid, PayoutModel.created_at >= since,
            PayoutModel.created_at < until)) or 0)
        report.refunded = _house_cost(session, Book.refunds, since, until)
        report.verification = _house_cost(session, Book.verification, since, until)
        report.outstanding_holds = _sum_balances(session, Book.customer_held)
        report.payable = _sum_balances(session, Book.provider_payable)
    else:
        report.outstanding_holds = ledger.balance(session, Book.customer_held, account_id)
    session.commit()
    return report


def _sum_balances(session: Session, book: Book) -> int:
    return int(session.scalar(select(func.coalesce(func.sum(LedgerBalanceModel.balance), 0))
                              .where(LedgerBalanceModel.book == book)) or 0)


def _house_cost(session: Session, book: Book, since: datetime, until: datetime) -> int:
    """What a house book of costs (refunds, verification) paid out in the period."""
    from coordinator.db.tables import LedgerPostingModel  # noqa: PLC0415

    return -int(session.scalar(
        select(func.coalesce(func.sum(LedgerPostingModel.amount), 0))
        .join(LedgerTransactionModel, LedgerTransactionModel.id == LedgerPostingModel.transaction_id)
        .where(LedgerPostingModel.book == book, LedgerTransactionModel.created_at >= since,
               LedgerTransactionModel.created_at < until)) or 0)


# --- fleet ------------------------------------------------------------------------------------------

FLEET_SORTS = {
    "name": WorkerModel.name, "state": WorkerModel.state, "gpu": WorkerModel.gpu_name,
    "price": WorkerModel.ask_price_per_gpu_hour, "reliability": WorkerModel.reliability,
    "seen": WorkerModel.last_heartbeat_at,
}


@dataclass
class Page:
    rows: list[Any]
    total: int
    page: int
    pages: int
    extra: dict[str, Any] = field(default_factory=dict)


EXPORT_ROWS = 100_000  # the most rows one CSV export carries


def _paged(session: Session, stmt: Select[Any], page: int, count_stmt: Select[Any],
           size: int = PAGE_SIZE) -> tuple[list[Any], int, int, int]:
    total = int(session.scalar(count_stmt) or 0)
    pages = max((total + size - 1) // size, 1)
    page = min(max(page, 1), pages)
    rows = list(session.scalars(stmt.limit(size).offset((page - 1) * size)))
    return rows, total, page, pages


def _filters(owner: Any, owner_id: str | None, state_column: Any, states: type[enum.Enum], state: str | None,
             param: str) -> list[Any]:
    """Rows of one owner (when given) in one state (when given); an unknown state is a 400."""
    conditions = [owner == owner_id] if owner_id is not None else []
    if state:
        if state not in {s.value for s in states}:
            raise InvalidRequest(f"Unknown {param} {state!r}.", param=param)
        conditions.append(state_column == states(state))
    return conditions


def fleet(*, session: Session, state: str | None, q: str | None, sort: str, descending: bool, page: int,
          provider_id: str | None = None, size: int = PAGE_SIZE) -> Page:
    w = WorkerModel
    conditions = _filters(w.account_id, provider_id, w.state, WorkerState, state, "state")
    if q:
        like = f"%{q.lower()}%"
        conditions.append(or_(func.lower(w.name).like(like), func.lower(w.gpu_name).like(like), w.id == q))
    column = FLEET_SORTS.get(sort)
    if column is None:
        raise InvalidRequest(f"Cannot sort by {sort!r}.", param="sort")
    stmt = select(w).where(*conditions).order_by(column.desc() if descending else column.asc(), w.id)
    rows, total, page, pages = _paged(session, stmt, page, select(func.count()).select_from(w).where(*conditions), size)
    earnings = dict(session.execute(
        select(UsageRecordModel.worker_id, func.sum(UsageRecordModel.provider_micros))
        .where(UsageRecordModel.worker_id.in_([r.id for r in rows])).group_by(UsageRecordModel.worker_id)).all()) if rows else {}
    scope = [w.account_id == provider_id] if provider_id is not None else []
    counts = dict(session.execute(select(w.state, func.count()).where(*scope).group_by(w.state)).all())
    session.commit()
    return Page(rows=rows, total=total, page=page, pages=pages,
                extra={"earnings": {k: int(v or 0) for k, v in earnings.items()},
                       "states": {s.value: int(n) for s, n in counts.items()}})


# --- jobs -------------------------------------------------------------------------------------------

def jobs(*, session: Session, status: str | None, customer: str | None, model: str | None, worker: str | None,
         page: int, account_id: str | None = None, size: int = PAGE_SIZE) -> Page:
    j = JobModel
    conditions = _filters(j.account_id, account_id, j.status, JobStatus, status, "status")
    if customer:
        conditions.append(j.account_id == customer)
    if model:
        conditions.append(j.model == model)
    if worker:
        conditions.append(exists().where(and_(LeaseModel.job_id == j.id, LeaseModel.worker_id == worker)))
    stmt = select(j).where(*conditions).order_by(j.id.desc())
    rows, total, page, pages = _paged(session, stmt, page, select(func.count()).select_from(j).where(*conditions), size)
    names = dict(session.execute(select(AccountModel.id, AccountModel.name).where(
        AccountModel.id.in_({r.account_id for r in rows}))).all()) if rows else {}
    session.commit()
    return Page(rows=rows, total=total, page=page, pages=pages, extra={"customers": names})


@dataclass
class JobDetail:
    job: JobModel
    customer: AccountModel
    leases: list[tuple[LeaseModel, WorkerModel]]
    usage: list[UsageRecordModel]
    checkpoints: list[JobCheckpointModel]
    losses: dict[str, list[tuple[float, float]]]
    events: list[JobEventModel]
    refunded: int
    evaluation: list[dict[str, Any]] = field(default_factory=list)  # prompt, base, tuned, reference per example


def job_detail(*, session: Session, job_id: str, account_id: str | None = None) -> JobDetail:
    job = session.get(JobModel, job_id)
    if job is None or (account_id is not None and job.account_id != account_id):
        raise NotFound(f"No such fine-tuning job: {job_id}", param="job_id")
    customer = session.get(AccountModel, job.account_id)
    assert customer is not None
    leases = [(lease, worker) for lease, worker in session.execute(
        select(LeaseModel, WorkerModel).join(WorkerModel, WorkerModel.id == LeaseModel.worker_id)
        .where(LeaseModel.job_id == job_id).order_by(LeaseModel.fencing_token))]
    usage = list(session.scalars(select(UsageRecordModel).where(UsageRecordModel.job_id == job_id)
                                 .order_by(UsageRecordModel.created_at)))
    checkpoints = list(session.scalars(select(JobCheckpointModel).where(JobCheckpointModel.job_id == job_id)
                                       .order_by(JobCheckpointModel.step_number)))
    metrics = session.scalars(select(JobEventModel.data).where(JobEventModel.job_id == job_id,
                                                               JobEventModel.type == "metrics").order_by(JobEventModel.id)
                              .limit(5000)).all()
    losses: dict[str, list[tuple[float, float]]] = {"training loss": [], "validation loss": []}
    for data in metrics:
        if not data or data.get("step") is None:
            continue
        if data.get("train_loss") is not None:
            losses["training loss"].append((float(data["step"]), float(data["train_loss"])))
        if data.get("valid_loss") is not None:
            losses["validation loss"].append((float(data["step"]), float(data["valid_loss"])))
    events = list(session.scalars(select(JobEventModel).where(JobEventModel.job_id == job_id, JobEventModel.type == "message")
                                  .order_by(JobEventModel.id.desc()).limit(30)))
    refunded = billing.job_refunded(session, job_id)
    evaluation = evaluations.side_by_side(session, job)
    session.commit()
    return JobDetail(job=job, customer=customer, leases=leases, usage=usage, checkpoints=checkpoints, losses=losses,
                     events=events, refunded=refunded, evaluation=evaluation)

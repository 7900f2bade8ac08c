"""The coordinator's Prometheus metrics (`GET /metrics`), named by Prometheus' conventions.

Events are counted where their owner makes them (a lease started or ended, a ledger transaction posted), and only
once the transaction that made them commits (`count_on_commit`): a rolled-back placement counts nothing. What is a
state rather than an event (jobs by status, workers by state, the Stripe outbox's backlog) is read from the
database when Prometheus scrapes, so every API process answers the same. With `PROMETHEUS_MULTIPROC_DIR` set (several
uvicorn processes on one host) the event metrics of all of them are summed, as prometheus-client does.

The endpoint is off unless `TUNEGRID_METRICS_TOKEN` is set, and then answers only `Authorization: Bearer <token>`
(Prometheus' `authorization` scrape setting): queue depth and money flow are an operator's, not the internet's.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from coordinator.db.tables import JobModel, JobStatus, OutboxModel, OutboxStatus, WorkerModel

CONTENT_TYPE = CONTENT_TYPE_LATEST
REQUEST_SECONDS = Histogram(
    "tunegrid_http_request_duration_seconds", "HTTP requests by route template, method and status.",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
LEASES_STARTED = Counter("tunegrid_leases_started_total", "Leases placed on a worker (placements), by lease kind.",
                         ["kind"])
LEASES_ENDED = Counter("tunegrid_leases_ended_total", "Leases ended, by lease kind and how they ended.",
                       ["kind", "status"])
LEDGER_TRANSACTIONS = Counter("tunegrid_ledger_transactions_total", "Balanced ledger transactions posted, by kind.",
                              ["kind"])
LEDGER_POSTINGS = Counter("tunegrid_ledger_postings_total", "Ledger postings (entries) written.")
OPEN_STATUSES = (JobStatus.validating_files, JobStatus.queued, JobStatus.running, JobStatus.paused)


def count_on_commit(session: Session, counter: Counter, amount: float = 1, **labels: str) -> None:
    """Count when `session` commits; nothing if it rolls back."""
    session.info.setdefault("tunegrid_metrics", []).append((counter, labels, amount))


@event.listens_for(Session, "after_commit")
def _apply(session: Session) -> None:
    if session.in_nested_transaction():  # a savepoint released: the transaction around it may still roll back
        return
    for counter, labels, amount in session.info.pop("tunegrid_metrics", ()):
        (counter.labels(**labels) if labels else counter).inc(amount)


@event.listens_for(Session, "after_soft_rollback")
def _discard(session: Session, previous: Any) -> None:
    if not previous.nested:  # the whole transaction, not a savepoint inside it
        session.info.pop("tunegrid_metrics", None)


class DatabaseState(Collector):
    """Gauges read when scraped: open jobs by status and kind, workers by state, the outbox's backlog."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def collect(self) -> Any:
        jobs = GaugeMetricFamily("tunegrid_jobs", "Jobs not yet ended, by status and kind (the queue's depth).",
                                 labels=["status", "kind"])
        counts = dict(((status, kind), n) for status, kind, n in self.session.execute(
            select(JobModel.status, JobModel.kind, func.count()).where(JobModel.status.in_(OPEN_STATUSES))
            .group_by(JobModel.status, JobModel.kind)))
        for (status, kind), n in sorted(counts.items()):
            jobs.add_metric([status.value, kind], n)
        for status in OPEN_STATUSES:  # every open status present, at 0 when empty: a queue that drained reads 0
            if not any(s == status for s, _ in counts):
                jobs.add_metric([status.value, "fine_tuning"], 0)
        yield jobs
        workers = GaugeMetricFamily("tunegrid_workers", "Registered workers by state.", labels=["state"])
        for state, n in self.session.execute(select(WorkerModel.state, func.count()).group_by(WorkerModel.state)):
            workers.add_metric([state.value], n)
        yield workers
        outbox = GaugeMetricFamily("tunegrid_outbox_messages", "Stripe calls not yet done, by status.",
                                   labels=["status"])
        for status in (OutboxStatus.pending, OutboxStatus.failed):
            outbox.add_metric([status.value], self.session.scalar(
                select(func.count()).select_from(OutboxModel).where(OutboxModel.status == status)) or 0)
        yield outbox


def exposition(session: Session) -> bytes:
    """The text Prometheus scrapes: this process's (or, in multiprocess mode, every process's) event metrics,
    then the database's gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess  # noqa: PLC0415

        events = CollectorRegistry()
        multiprocess.MultiProcessCollector(events)
    else:
        events = REGISTRY
    state = CollectorRegistry(auto_describe=False)
    state.register(DatabaseState(session))
    return generate_latest(events) + generate_latest(state)

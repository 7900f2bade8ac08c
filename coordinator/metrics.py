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
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from coordinator.db.tables import JobModel, JobStatus, OutboxModel, OutboxStatus, WorkerModel, WorkerState, utcnow

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
CLAIM_SECONDS = Histogram(
    "tunegrid_claim_duration_seconds", "Workers' claims (long-polls) from arrival to answer, by outcome.", ["outcome"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0),
)
CELERY_TASKS = Counter("tunegrid_celery_tasks_total", "Periodic tasks Celery ran, by task and outcome.",
                       ["task", "outcome"])
CELERY_TASK_SECONDS = Histogram("tunegrid_celery_task_duration_seconds", "Periodic tasks' run time.", ["task"],
                                buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0))
HEARTBEAT_AGE_BUCKETS = (5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)
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
        yield self._heartbeat_ages()

    def _heartbeat_ages(self) -> HistogramMetricFamily:
        """How long ago each worker that is not offline was last heard from (database time, written in batches
        every few seconds): heartbeat lag across the fleet, as it is at this scrape."""
        now = utcnow()
        ages = sorted((now - seen).total_seconds() for seen in self.session.scalars(
            select(WorkerModel.last_heartbeat_at).where(WorkerModel.state != WorkerState.offline,
                                                        WorkerModel.last_heartbeat_at.is_not(None))))
        buckets = [(str(bound), sum(1 for a in ages if a <= bound)) for bound in HEARTBEAT_AGE_BUCKETS]
        family = HistogramMetricFamily("tunegrid_worker_heartbeat_age_seconds",
                                       "Seconds since each worker that is not offline was last heard from.")
        family.add_metric([], [*buckets, ("+Inf", len(ages))], sum_value=sum(ages))
        return family


def _events() -> CollectorRegistry:
    """This process's event metrics, or, with PROMETHEUS_MULTIPROC_DIR, every process's of this host summed."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    from prometheus_client import multiprocess  # noqa: PLC0415

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def serve(port: int) -> None:
    """Metrics over HTTP from a process that answers no requests of its own (a Celery worker): its prefork
    children's counts, through PROMETHEUS_MULTIPROC_DIR when set. Bind it to the private network only."""
    from prometheus_client import start_http_server  # noqa: PLC0415

    start_http_server(port, registry=_events())


def exposition(session: Session) -> bytes:
    """The text Prometheus scrapes: the event metrics, then the database's gauges."""
    state = CollectorRegistry(auto_describe=False)
    state.register(DatabaseState(session))
    return generate_latest(_events()) + generate_latest(state)

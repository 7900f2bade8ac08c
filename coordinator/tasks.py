"""Background tasks: reap quiet leases, place queued jobs, refresh worker scores, keep running jobs within
their holds and budgets, send Stripe calls waiting in the outbox, and pay providers.

Each task takes ids or nothing, is idempotent, and is safe to run in several processes at once (rows
are claimed with `FOR UPDATE SKIP LOCKED`). With Redis they run on Celery (broker: Redis) with beat
schedules: `celery -A coordinator.tasks worker` and `celery -A coordinator.tasks beat`. In embedded mode
the coordinator's dispatcher runs the same functions in-process (`run_periodic`).
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from functools import cache
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from coordinator.effects import Effects, take_effects
from coordinator.metrics import CELERY_TASK_SECONDS, CELERY_TASKS
from coordinator.services import (
    batches, blobs, budgets, integrations, jobs, lease_states, placement, stripe_sync, verification, worker_states,
)
from coordinator.settings import CoordinatorSettings
from coordinator.stores import open_store
from coordinator.stripe_gateway import StripeGateway, make_gateway

log = logging.getLogger(__name__)
# A job is validated just after its create answered; one still `validating_files` after this was left by a
# process that stopped in between.
VALIDATION_GRACE_S = 30.0
SCORE_BATCH = 1000


def reap_leases(*, session: Session, settings: CoordinatorSettings) -> dict[str, int]:
    """Quiet leases (`lease_states.reap`), jobs that waited too long for a verifier (`verification`), and batches
    past their completion window (`batches.expire`)."""
    counts = lease_states.reap(session=session, settings=settings)
    store = open_store(settings)
    counts["unverified"] = verification.stop_waiting(session=session, store=store, settings=settings)
    counts["expired_batches"] = batches.expire(session=session, store=store)
    return counts


def place_queued_jobs(*, session: Session, settings: CoordinatorSettings) -> int:
    return placement.place_queued_jobs(session=session, settings=settings)


def enforce_budgets(*, session: Session, settings: CoordinatorSettings) -> dict[str, int]:
    return budgets.enforce_budgets(session=session, settings=settings)


_GATEWAYS: dict[tuple[str | None, str | None], StripeGateway | None] = {}


def gateway_for(settings: CoordinatorSettings) -> StripeGateway | None:
    key = (settings.stripe_api_key, settings.stripe_api_base)
    if key not in _GATEWAYS:
        _GATEWAYS[key] = make_gateway(settings)
    return _GATEWAYS[key]


def send_outbox(*, session: Session, settings: CoordinatorSettings) -> int:
    """Stripe calls not yet answered (a crash, a timeout, Stripe down): sent again, same idempotency key."""
    gateway = gateway_for(settings)
    return stripe_sync.send_due(session=session, gateway=gateway) if gateway else 0


def run_payouts(*, session: Session, settings: CoordinatorSettings) -> int:
    return stripe_sync.run_payouts(session=session, settings=settings, gateway=gateway_for(settings))


def update_worker_scores(*, session: Session, settings: CoordinatorSettings) -> int:
    return worker_states.rescore_fleet(session=session, settings=settings)


# Each task and how often it runs, in seconds (embedded mode; Celery beat has the same schedule).
def collect_blobs(*, session: Session, settings: CoordinatorSettings) -> int:
    collected = blobs.collect(session=session, store=open_store(settings), settings=settings)
    return collected.files + collected.checkpoints + collected.orphans


def validate_waiting_jobs(*, session: Session, settings: CoordinatorSettings) -> int:
    return jobs.validate_waiting(session=session, store=open_store(settings),
                                 older_than=timedelta(seconds=VALIDATION_GRACE_S))


def forward_integrations(*, session: Session, settings: CoordinatorSettings) -> int:
    return integrations.forward(session=session, settings=settings)


PERIODIC: tuple[tuple[Any, Any], ...] = (
    (reap_leases, lambda s: s.sweep_interval_s),
    (enforce_budgets, lambda s: s.sweep_interval_s),
    (place_queued_jobs, lambda s: s.sweep_interval_s),
    (update_worker_scores, lambda s: 60.0),
    (send_outbox, lambda s: s.outbox_interval_s),
    (run_payouts, lambda s: s.payout_interval_s),
    (collect_blobs, lambda s: s.blob_collect_interval_s),
    (forward_integrations, lambda s: s.integrations_interval_s),
    (validate_waiting_jobs, lambda s: s.sweep_interval_s),
)


def run_periodic(
    *, session_factory: sessionmaker[Session], settings: CoordinatorSettings, last_run: dict[str, float] | None = None,
) -> Effects:
    """Each periodic task whose interval has passed since `last_run` (the caller's record; without one, every
    task), each in its own session; the effects they asked for, merged."""
    merged = Effects()
    now = time.monotonic()
    for task, interval in PERIODIC:
        if last_run is not None:
            last = last_run.get(task.__name__)
            if last is not None and now - last < interval(settings) * 0.9:
                continue
            last_run[task.__name__] = now
        with session_factory() as session:
            try:
                task(session=session, settings=settings)
            except Exception:  # noqa: BLE001 - one task's failure must not stop the others
                log.exception("periodic task %s failed", task.__name__)
                continue
            done = take_effects(session)
            merged.placeable |= done.placeable
            merged.wake |= done.wake
            merged.recheck |= done.recheck
    return merged


# --- Celery ---------------------------------------------------------------------------------------

@cache
def _runtime() -> tuple[CoordinatorSettings, sessionmaker[Session], Any]:
    from coordinator.db.engine import make_engine, make_sessionmaker  # noqa: PLC0415

    settings = CoordinatorSettings()
    redis_client = None
    if settings.redis_url:
        import redis  # noqa: PLC0415

        redis_client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    return settings, make_sessionmaker(make_engine(settings)), redis_client


def publish_effects(redis_client: Any, effects: Effects) -> None:
    """From a Celery process: wake long-polls and trigger lease rechecks in whichever API process holds them."""
    from coordinator.hotstate import WAKE_CHANNEL, announce_recheck  # noqa: PLC0415

    if redis_client is None or not effects:
        return
    try:
        pipe = redis_client.pipeline(transaction=False)
        for worker_id in effects.wake:
            pipe.publish(WAKE_CHANNEL, worker_id)
        for worker_id in effects.recheck:
            announce_recheck(pipe, worker_id)
        pipe.execute()
    except Exception as exc:  # noqa: BLE001 - workers still find their leases at their next poll
        log.warning("effects not published (%s)", exc.__class__.__name__)


def _run_task(task: Any) -> Any:
    settings, session_factory, redis_client = _runtime()
    began, outcome = time.perf_counter(), "failure"
    try:
        with session_factory() as session:
            result = task(session=session, settings=settings)
            publish_effects(redis_client, take_effects(session))
        outcome = "success"
        return result
    finally:
        CELERY_TASKS.labels(task.__name__, outcome).inc()
        CELERY_TASK_SECONDS.labels(task.__name__).observe(time.perf_counter() - began)


def make_celery(settings: CoordinatorSettings | None = None):  # type: ignore[no-untyped-def]
    from celery import Celery  # noqa: PLC0415

    settings = settings or CoordinatorSettings()
    app = Celery("tunegrid", broker=settings.redis_url or "memory://")
    app.conf.update(
        task_acks_late=True, task_time_limit=120, task_soft_time_limit=100, broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1, task_ignore_result=True,
        beat_schedule={
            "reap-leases": {"task": "tunegrid.reap_leases", "schedule": settings.sweep_interval_s},
            "place-queued-jobs": {"task": "tunegrid.place_queued_jobs", "schedule": settings.sweep_interval_s},
            "enforce-budgets": {"task": "tunegrid.enforce_budgets", "schedule": settings.sweep_interval_s},
            "update-worker-scores": {"task": "tunegrid.update_worker_scores", "schedule": 60.0},
            "send-outbox": {"task": "tunegrid.send_outbox", "schedule": settings.outbox_interval_s},
            "run-payouts": {"task": "tunegrid.run_payouts", "schedule": float(settings.payout_interval_s)},
            "collect-blobs": {"task": "tunegrid.collect_blobs", "schedule": settings.blob_collect_interval_s},
            "forward-integrations": {"task": "tunegrid.forward_integrations",
                                     "schedule": settings.integrations_interval_s},
            "validate-waiting-jobs": {"task": "tunegrid.validate_waiting_jobs", "schedule": settings.sweep_interval_s},
        },
    )

    if settings.celery_metrics_port:
        from celery.signals import worker_init  # noqa: PLC0415

        @worker_init.connect(weak=False)
        def _serve_metrics(**_: Any) -> None:  # in the worker's main process, before its children fork
            from coordinator.metrics import serve  # noqa: PLC0415

            serve(settings.celery_metrics_port)  # type: ignore[arg-type]

    @app.task(name="tunegrid.reap_leases")
    def reap_leases_task() -> dict[str, int]:
        return _run_task(reap_leases)

    @app.task(name="tunegrid.place_queued_jobs")
    def place_queued_jobs_task() -> int:
        return _run_task(place_queued_jobs)

    @app.task(name="tunegrid.enforce_budgets")
    def enforce_budgets_task() -> dict[str, int]:
        return _run_task(enforce_budgets)

    @app.task(name="tunegrid.send_outbox")
    def send_outbox_task() -> int:
        return _run_task(send_outbox)

    @app.task(name="tunegrid.run_payouts")
    def run_payouts_task() -> int:
        return _run_task(run_payouts)

    @app.task(name="tunegrid.update_worker_scores")
    def update_worker_scores_task() -> int:
        return _run_task(update_worker_scores)

    @app.task(name="tunegrid.collect_blobs")
    def collect_blobs_task() -> int:
        return _run_task(collect_blobs)

    @app.task(name="tunegrid.validate_waiting_jobs")
    def validate_waiting_jobs_task() -> int:
        return _run_task(validate_waiting_jobs)

    @app.task(name="tunegrid.forward_integrations")
    def forward_integrations_task() -> int:
        return _run_task(forward_integrations)

    return app


def __getattr__(name: str) -> Any:
    # `celery -A coordinator.tasks` looks for `app`; built on first use so importing this module reads no config.
    if name == "app":
        return _celery_app()
    raise AttributeError(name)


@cache
def _celery_app():  # type: ignore[no-untyped-def]
    return make_celery()

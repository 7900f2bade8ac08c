"""The coordinator's FastAPI application, built from settings (`create_app`)."""

from __future__ import annotations

import gc
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text

from coordinator import __version__
from coordinator import tasks
from coordinator.api import (
    batches, billing, catalog, errors, exports, files, jobs, leases, providers, quotes, webhooks, workers,
)
from coordinator.api.deps import authenticate_customer, run_in_session
from coordinator.dashboard import admin as admin_pages, auth as auth_pages, own as own_pages
from coordinator.dashboard.pages import HERE as DASHBOARD_DIR
from coordinator.api.limits import AuthenticateUploads, BodySizeLimit
from coordinator.db.engine import make_engine, make_sessionmaker
from coordinator.db.migrate import upgrade_head
from coordinator.dispatch import Dispatcher
from coordinator.heartbeat_flush import Batch, HeartbeatBuffer
from coordinator.hotstate import RedisHotState, make_hot_state
from coordinator.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, exposition
from coordinator.ratelimit import MemoryRateLimiter, RedisRateLimiter
from coordinator.request_ids import RequestIds, configure_logging
from coordinator.services import placement, workers as worker_service
from coordinator.settings import CoordinatorSettings
from coordinator.stores import open_store
from coordinator.stripe_gateway import make_gateway
from shared.errors import AuthenticationFailed, NotFound
from shared.protocol import HeartbeatReply

log = logging.getLogger(__name__)
JSON_BODY_LIMIT = 1024 * 1024
GC_THRESHOLDS = (20_000, 20, 20)
SPARE_THREADS = 4


def create_app(settings: CoordinatorSettings | None = None) -> FastAPI:
    settings = settings or CoordinatorSettings()
    configure_logging(json_lines=settings.json_logs, level=settings.log_level)  # each uvicorn worker process too
    engine = make_engine(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.should_auto_migrate:
            upgrade_head(settings.resolved_database_url)
        # One admitted request per pooled connection (see run_in_session); threads for all of them plus a few
        # for work that holds no connection (streaming a download), and no more: extra threads only add
        # GIL contention.
        connections = sum(settings.connections)
        app.state.session_slots = anyio.Semaphore(connections)
        anyio.to_thread.current_default_thread_limiter().total_tokens = connections + SPARE_THREADS
        # Long-lived objects built at start-up (routes, models, schemas) need not be scanned by every
        # collection; fewer, later gen-0 collections keep pauses out of the p99.
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        await app.state.hot.start()
        app.state.dispatcher.start()
        app.state.heartbeats.start()
        try:
            yield
        finally:
            await app.state.heartbeats.stop()
            await app.state.dispatcher.stop()
            await app.state.hot.close()
            engine.dispose()

    async def place() -> int:
        placed = await run_in_session(app.state, lambda session: placement.place_queued_jobs(
            session=session, settings=settings))
        if placed >= settings.placement_batch:
            app.state.dispatcher.kick()  # a full batch: there may be more
        return placed

    async def flush_heartbeats(batch: Batch) -> None:
        await run_in_session(app.state, lambda session: worker_service.flush_heartbeats(session=session, batch=batch))

    async def periodic() -> None:
        async with app.state.session_slots:
            effects = await anyio.to_thread.run_sync(lambda: tasks.run_periodic(
                session_factory=app.state.sessionmaker, settings=settings, last_run=app.state.periodic_last_run))
        await app.state.dispatcher.apply(effects)

    app = FastAPI(
        title="tunegrid coordinator",
        version=__version__,
        description="OpenAI-compatible fine-tuning API for a marketplace of spare GPUs.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.store = open_store(settings)
    app.state.hot = make_hot_state(settings.redis_url)
    app.state.limiter = (RedisRateLimiter(settings.rate_limit_per_minute, app.state.hot.client)
                         if isinstance(app.state.hot, RedisHotState) else MemoryRateLimiter(settings.rate_limit_per_minute))
    app.state.worker_limiter = (
        RedisRateLimiter(settings.worker_rate_limit_per_minute, app.state.hot.client, namespace="w")
        if isinstance(app.state.hot, RedisHotState) else MemoryRateLimiter(settings.worker_rate_limit_per_minute))
    app.state.stripe = make_gateway(settings)  # None without a Stripe key (the embedded default)
    app.state.periodic_last_run = {}
    app.state.heartbeats = HeartbeatBuffer(flush_heartbeats, settings.heartbeat_flush_s)
    app.state.quiet_heartbeat_reply = HeartbeatReply(heartbeat_interval_s=settings.heartbeat_interval_s).model_dump_json().encode()
    # With Redis, Celery beat runs the periodic tasks; embedded, this process does.
    app.state.dispatcher = Dispatcher(hot=app.state.hot, place=place, interval_s=settings.sweep_interval_s,
                                      periodic=periodic if settings.runs_periodic_tasks else None)
    errors.install(app)
    app.add_middleware(AuthenticateUploads, authenticate=lambda key: authenticate_customer(app.state, key))
    app.add_middleware(BodySizeLimit, upload_bytes=settings.max_upload_bytes, other_bytes=JSON_BODY_LIMIT,
                       lease_upload_bytes=settings.max_adapter_bytes, export_upload_bytes=settings.max_export_bytes)
    app.add_middleware(RequestIds)  # added last: outermost, so every answer and log line has its id
    for router in (files.router, jobs.router, exports.router, batches.router, quotes.router, catalog.router, leases.router, workers.router,
                   billing.router, providers.router, webhooks.router, auth_pages.router, admin_pages.router,
                   own_pages.router):
        app.include_router(router)
    app.mount("/dashboard-static", StaticFiles(directory=DASHBOARD_DIR / "static"), name="dashboard-static")

    @app.get("/metrics", tags=["health"], include_in_schema=False)
    async def metrics(request: Request) -> Response:
        token = settings.metrics_token
        if not token:
            raise NotFound("Metrics are off: set TUNEGRID_METRICS_TOKEN to scrape them.")
        offered = request.headers.get("authorization", "").removeprefix("Bearer ").encode()
        if not hmac.compare_digest(offered, token.encode()):
            raise AuthenticationFailed("Metrics need Authorization: Bearer <TUNEGRID_METRICS_TOKEN>.")
        body = await run_in_session(app.state, exposition)
        return Response(body, media_type=METRICS_CONTENT_TYPE)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        await run_in_session(app.state, lambda session: session.execute(text("SELECT 1")))
        return {"status": "ok", "version": __version__}

    return app

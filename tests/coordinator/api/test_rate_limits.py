"""Key-authenticated routes are rate limited per key: past the limit a 429 with Retry-After and the error
envelope; other keys are not affected; a wrong key is limited too (no free guessing)."""

from __future__ import annotations

import time

import anyio
import pytest
from fastapi.testclient import TestClient

from coordinator.app import create_app
from coordinator.ratelimit import MemoryRateLimiter, RedisRateLimiter
from shared.errors import RateLimited


def _mid_minute() -> float:
    """Now, held 20 s into the current minute: a slow run must not cross into a new window mid-test."""
    return (time.time() // 60) * 60 + 20


def test_past_the_limit_a_key_gets_429_with_retry_after(settings, customer, other_customer) -> None:  # type: ignore[no-untyped-def]
    app = create_app(settings.model_copy(update={"rate_limit_per_minute": 5}))
    app.state.limiter.clock = _mid_minute
    with TestClient(app) as client:
        statuses = [client.get("/v1/fine_tuning/jobs", headers=customer.headers).status_code for _ in range(6)]
        assert statuses == [200] * 5 + [429]
        limited = client.get("/v1/files", headers=customer.headers)
        assert limited.status_code == 429 and 1 <= int(limited.headers["Retry-After"]) <= 61
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert limited.json()["error"]["type"] == "rate_limit_error"
        assert client.get("/v1/files", headers=other_customer.headers).status_code == 200
        guesses = [client.get("/v1/files", headers={"Authorization": "Bearer tg_000000000000_guess"}).status_code
                   for _ in range(6)]
        assert guesses == [401] * 5 + [429]
    app.state.engine.dispose()


def test_worker_routes_are_limited_per_token(settings, make_caller) -> None:  # type: ignore[no-untyped-def]
    """Heartbeats, claims, events and uploads count against the worker's token; another worker is unaffected,
    and a made-up token is limited like a real one."""
    from tests.fakes import FakeAgent  # noqa: PLC0415

    app = create_app(settings.model_copy(update={"worker_rate_limit_per_minute": 4}))
    app.state.worker_limiter.clock = _mid_minute
    provider = make_caller("provider", "pat")
    with TestClient(app) as client:
        noisy, quiet = FakeAgent.register(client, provider.key, "pc-1"), FakeAgent.register(client, provider.key, "pc-2")
        statuses = [noisy.heartbeat().status_code for _ in range(5)]
        assert statuses == [200] * 4 + [429]
        events = client.post("/v1/workers/leases/lease-x/events", headers=noisy.headers("lease-x", 1),
                             json={"events": [{"type": "log", "message": "hi"}]})
        assert events.status_code == 429 and events.json()["error"]["code"] == "rate_limit_exceeded"
        assert quiet.heartbeat().status_code == 200
        made_up = {"Authorization": "Bearer tgw_0000000000_guess", "Tunegrid-Protocol": "1"}
        guesses = [client.post("/v1/workers/heartbeat", json={"activity": "idle"}, headers=made_up).status_code
                   for _ in range(5)]
        assert guesses[-1] == 429
    app.state.engine.dispose()


def test_a_provider_has_a_cap_on_registered_workers(settings, make_caller) -> None:  # type: ignore[no-untyped-def]
    from tests.fakes import PROTOCOL_HEADER, PROTOCOL_VERSION, registration  # noqa: PLC0415

    app = create_app(settings.model_copy(update={"max_workers_per_provider": 2}))
    provider = make_caller("provider", "pat")
    headers = {**provider.headers, PROTOCOL_HEADER: str(PROTOCOL_VERSION)}
    with TestClient(app) as client:
        assert [client.post("/v1/workers/register", json=registration(f"pc-{i}"), headers=headers).status_code
                for i in range(3)] == [200, 200, 409]
        third = client.post("/v1/workers/register", json=registration("pc-2"), headers=headers)
        assert third.json()["error"]["code"] == "worker_limit_reached"
        assert client.post("/v1/workers/register", json=registration("pc-0"), headers=headers).status_code == 200
    app.state.engine.dispose()


def test_the_window_resets_each_minute() -> None:
    import coordinator.ratelimit as ratelimit  # noqa: PLC0415

    now = [1_000_040.0]  # 20 s into a minute
    limiter = MemoryRateLimiter(2, clock=lambda: now[0])
    anyio.run(limiter.check, "k")
    anyio.run(limiter.check, "k")
    with pytest.raises(ratelimit.RateLimited) as refused:
        anyio.run(limiter.check, "k")
    assert refused.value.retry_after_s == 41
    now[0] += 60
    anyio.run(limiter.check, "k")  # a new minute


def test_redis_counts_for_every_process(redis_url: str) -> None:
    import redis.asyncio as redis  # noqa: PLC0415

    async def run() -> int:
        client = redis.Redis.from_url(redis_url)
        first, second = RedisRateLimiter(3, client), RedisRateLimiter(3, client)  # two API processes
        first.clock = second.clock = lambda: 1_000_040.0
        key = f"k-{time.time()}"
        await first.check(key)
        await second.check(key)
        await first.check(key)
        await first.sync()  # what each process counted reaches the other within `SYNC_S`
        await second.sync()
        try:
            await second.check(key)
        except RateLimited as exc:
            await client.aclose()
            return exc.retry_after_s
        await client.aclose()
        raise AssertionError("the fourth request passed")

    assert anyio.run(run) == 41

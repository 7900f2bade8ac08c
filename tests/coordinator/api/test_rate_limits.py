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


def test_past_the_limit_a_key_gets_429_with_retry_after(settings, customer, other_customer) -> None:  # type: ignore[no-untyped-def]
    app = create_app(settings.model_copy(update={"rate_limit_per_minute": 5}))
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


def test_the_window_resets_each_minute(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import coordinator.ratelimit as ratelimit  # noqa: PLC0415

    now = [1_000_040.0]  # 20 s into a minute
    monkeypatch.setattr(ratelimit.time, "time", lambda: now[0])
    limiter = MemoryRateLimiter(2)
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
        key = f"k-{time.time()}"
        await first.check(key)
        await second.check(key)
        await first.check(key)
        try:
            await second.check(key)
        except RateLimited as exc:
            await client.aclose()
            return exc.retry_after_s
        await client.aclose()
        raise AssertionError("the fourth request passed")

    assert 1 <= anyio.run(run) <= 61

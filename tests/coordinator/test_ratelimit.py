"""`coordinator/ratelimit.py`: a budget of requests per key per minute, in memory or in Redis (shared by every
coordinator process); the one over it is told when to retry; keys are kept only as digests; a Redis that is
away never refuses service."""

from __future__ import annotations

import uuid

import anyio
import pytest

from coordinator.ratelimit import MemoryRateLimiter, RedisRateLimiter, key_digest
from shared.errors import RateLimited


async def _spend(limiter, key: str, n: int) -> None:  # type: ignore[no-untyped-def]
    for _ in range(n):
        await limiter.check(key)


def test_the_request_over_the_budget_is_told_when_to_retry() -> None:
    limiter = MemoryRateLimiter(per_minute=3)
    anyio.run(_spend, limiter, "tg_key_a", 3)
    with pytest.raises(RateLimited) as limited:
        anyio.run(_spend, limiter, "tg_key_a", 1)
    assert 1 <= limited.value.retry_after_s <= 61
    anyio.run(_spend, limiter, "tg_key_b", 3)  # another key has its own budget


def test_no_budget_means_no_limit() -> None:
    anyio.run(_spend, MemoryRateLimiter(per_minute=0), "k", 1000)


def test_keys_are_kept_as_digests_only() -> None:
    digest = key_digest("tg_secret_key")
    assert "secret" not in digest and len(digest) == 32


def test_processes_share_one_budget_in_redis(redis_url: str) -> None:
    """Each process counts at once and shares its counts in the background; past half a key's budget every
    request is counted in Redis, so however the requests alternate between processes, the budget holds (a burst
    within one sync interval can pass it by what the other processes counted meanwhile, each under half)."""
    import redis.asyncio as aioredis  # noqa: PLC0415

    async def main() -> None:
        a, b = aioredis.Redis.from_url(redis_url), aioredis.Redis.from_url(redis_url)
        namespace = f"test-{uuid.uuid4().hex}"  # this test's own counters, whatever else the database holds
        first, second = RedisRateLimiter(10, a, namespace=namespace), RedisRateLimiter(10, b, namespace=namespace)
        served = 0
        for _ in range(3):  # each below half the budget on its own: counted locally
            for limiter in (first, second):
                await limiter.check("k")
                served += 1
        await first.sync()  # as the background does within `SYNC_S`
        await second.sync()
        for limiter in (first, second) * 10:
            try:
                await limiter.check("k")
                served += 1
            except RateLimited:
                pass
        assert served == 10
        await a.aclose()
        await b.aclose()

    anyio.run(main)


def test_with_redis_away_old_windows_are_forgotten() -> None:
    """A flood of distinct wrong keys during an outage: counts of past minutes are dropped, not kept for ever."""
    import redis.asyncio as aioredis  # noqa: PLC0415

    async def main() -> None:
        away = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
        now = [1_000_000.0]
        limiter = RedisRateLimiter(100, away)
        limiter.clock = lambda: now[0]
        for minute in range(3):
            for i in range(50):
                await limiter.check(f"wrong-{minute}-{i}")
            await limiter.sync()
            now[0] += 60
        await limiter.sync()
        assert len(limiter._synced) <= 50  # noqa: SLF001 - the last minute's, at most
        await away.aclose()

    anyio.run(main)


def test_one_process_counts_exactly_without_waiting_for_redis(redis_url: str) -> None:
    """The budget is enforced by this process's own count, whatever the background sync has done."""
    import redis.asyncio as aioredis  # noqa: PLC0415

    async def main() -> None:
        client = aioredis.Redis.from_url(redis_url)
        limiter = RedisRateLimiter(3, client, namespace=f"test-{uuid.uuid4().hex}")
        await _spend(limiter, "k", 3)
        with pytest.raises(RateLimited):
            await limiter.check("k")
        await limiter.sync()
        with pytest.raises(RateLimited):  # and still after the counts went to Redis and came back
            await limiter.check("k")
        await client.aclose()

    anyio.run(main)


def test_a_redis_that_is_away_never_refuses_service_beyond_the_budget() -> None:
    """Redis away: requests within the budget are served (this process counts alone), the one past it is not."""
    import redis.asyncio as aioredis  # noqa: PLC0415

    async def main() -> None:
        away = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
        limiter = RedisRateLimiter(5, away)
        await _spend(limiter, "k", 5)
        await limiter.sync()
        with pytest.raises(RateLimited):
            await limiter.check("k")
        await away.aclose()

    anyio.run(main)

"""Per-key rate limits for the key-authenticated API: a fixed one-minute window per key (the sha256 of what
was presented, so unknown and wrong keys are limited too), shared by every API process through Redis, or kept
in memory in embedded mode. Over the limit: 429 with Retry-After (the seconds to the window's end).

In Redis the counts are shared in the background (`RedisRateLimiter`), never on a request's path; Redis failing
never blocks a request beyond this process's own count: the limit is protection, not truth.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from shared.errors import RateLimited

log = logging.getLogger(__name__)
WINDOW_S = 60
SYNC_S = 0.25  # how often a process adds its counts to the shared ones (RedisRateLimiter)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class RateLimiter(ABC):
    def __init__(self, per_minute: int, clock: Callable[[], float] = time.time) -> None:
        self.per_minute = per_minute
        self.clock = clock  # the wall clock; a test holds it still so a run never straddles a minute

    async def check(self, key: str) -> None:
        """Count one request for `key`; RateLimited when the window's budget is spent."""
        if self.per_minute <= 0:
            return
        now = self.clock()
        window = int(now // WINDOW_S)
        count = await self._hit(key_digest(key), window)
        if count > self.per_minute:
            retry = max(int((window + 1) * WINDOW_S - now) + 1, 1)
            raise RateLimited(f"Rate limit reached: {self.per_minute} requests per minute for this key. "
                              f"Retry in {retry} s.", retry_after_s=retry)

    @abstractmethod
    async def _hit(self, digest: str, window: int) -> int:
        """Requests counted in this window for this key, this one included."""


class MemoryRateLimiter(RateLimiter):
    def __init__(self, per_minute: int, clock: Callable[[], float] = time.time) -> None:
        super().__init__(per_minute, clock)
        self._counts: dict[tuple[str, int], int] = {}
        self._window = 0

    async def _hit(self, digest: str, window: int) -> int:
        if window != self._window:  # a new minute: forget the old one
            self._counts.clear()
            self._window = window
        count = self._counts.get((digest, window), 0) + 1
        self._counts[(digest, window)] = count
        return count


class RedisRateLimiter(RateLimiter):
    """Counted in this process at once and added to the shared count in Redis in the background, at most every
    `SYNC_S`: a request never waits for Redis (the heartbeat's latency under load). Across processes a key's
    count can lag by what the others took since they last synced it, until it passes half its budget: from
    there each request is counted in Redis on its path. So the budget holds but for a burst within one sync
    interval, which can pass it by what the other processes counted meanwhile (each under half the budget).
    With Redis away each process counts alone."""

    def __init__(self, per_minute: int, redis_client, namespace: str = "") -> None:  # type: ignore[no-untyped-def]
        super().__init__(per_minute)
        self._redis = redis_client
        self._prefix = f"tg:rl{':' + namespace if namespace else ''}"
        self._synced: dict[tuple[str, int], int] = {}  # the shared count, as of the last sync
        self._sending: dict[tuple[str, int], int] = {}  # counted here, on the way to Redis
        self._unsent: dict[tuple[str, int], int] = {}  # counted here since
        self._last_sync = float("-inf")
        self._sync_task: asyncio.Task[None] | None = None

    async def _hit(self, digest: str, window: int) -> int:
        key = (digest, window)
        self._unsent[key] = self._unsent.get(key, 0) + 1
        if (self._sync_task is None or self._sync_task.done()) and time.monotonic() - self._last_sync >= SYNC_S:
            self._sync_task = asyncio.get_running_loop().create_task(self._sync())
        count = self._synced.get(key, 0) + self._sending.get(key, 0) + self._unsent[key]
        if count * 2 > self.per_minute:  # past half its budget a key is counted in Redis on the request's path
            return await self._count_now(key)
        return count

    async def _count_now(self, key: tuple[str, int]) -> int:
        """This key's shared count, with what this process counted since sent first: exact across processes,
        for keys close to their budget (a flood, never a worker's heartbeats)."""
        unsent = self._unsent.pop(key, 0)
        name = f"{self._prefix}:{key[0]}:{key[1]}"
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.incrby(name, unsent)
                pipe.expire(name, WINDOW_S * 2)
                total, _ = await pipe.execute()
            self._synced[key] = int(total)
        except Exception as exc:  # noqa: BLE001 - Redis away: this process's own count
            log.warning("rate limit counts not shared (%s)", exc.__class__.__name__)
            self._synced[key] = self._synced.get(key, 0) + unsent
        return self._synced[key] + self._sending.get(key, 0)

    async def sync(self) -> None:
        """Add what was counted here to Redis now and learn the shared counts back (tests; the background does
        this on its own)."""
        if self._sync_task is not None:
            await asyncio.wait([self._sync_task])
        await self._sync()

    async def _sync(self) -> None:
        self._last_sync = time.monotonic()
        window = int(self.clock() // WINDOW_S)
        self._synced = {k: v for k, v in self._synced.items() if k[1] >= window}  # Redis up or not
        self._sending, self._unsent = self._unsent, {}
        if not self._sending:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for (digest, w), count in self._sending.items():
                    pipe.incrby(f"{self._prefix}:{digest}:{w}", count)
                    pipe.expire(f"{self._prefix}:{digest}:{w}", WINDOW_S * 2)
                totals = (await pipe.execute())[::2]
            self._synced.update({k: int(total) for k, total in zip(self._sending, totals, strict=True)
                                 if k[1] >= window})
        except Exception as exc:  # noqa: BLE001 - never refuse service because Redis is away: count here alone
            log.warning("rate limit counts not shared (%s)", exc.__class__.__name__)
            for key, count in self._sending.items():
                if key[1] >= window:
                    self._synced[key] = self._synced.get(key, 0) + count
        finally:
            self._sending = {}

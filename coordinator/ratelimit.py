"""Per-key rate limits for the key-authenticated API: a fixed one-minute window per key (the sha256 of what
was presented, so unknown and wrong keys are limited too), shared by every API process through Redis, or kept
in memory in embedded mode. Over the limit: 429 with Retry-After (the seconds to the window's end).

Redis failing never blocks a request: the limit is protection, not truth.
"""

from __future__ import annotations

import hashlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from shared.errors import RateLimited

log = logging.getLogger(__name__)
WINDOW_S = 60


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
    def __init__(self, per_minute: int, redis_client, namespace: str = "") -> None:  # type: ignore[no-untyped-def]
        super().__init__(per_minute)
        self._redis = redis_client
        self._prefix = f"tg:rl{':' + namespace if namespace else ''}"

    async def _hit(self, digest: str, window: int) -> int:
        name = f"{self._prefix}:{digest}:{window}"
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.incr(name)
                pipe.expire(name, WINDOW_S * 2)
                count, _ = await pipe.execute()
            return int(count)
        except Exception as exc:  # noqa: BLE001 - never refuse service because Redis is away
            log.warning("rate limit not checked (%s)", exc.__class__.__name__)
            return 0

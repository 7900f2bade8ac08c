"""Hot state: the latest (and the last few) heartbeats per worker, which workers must re-read their lease,
long-poll wake-ups, and the worker tokens confirmed lately (and their revocations).

Two implementations behind one interface. `RedisHotState` lets every API process share them (wake-ups
and revocations travel on pub/sub channels that each process listens to). `MemoryHotState` is the embedded mode: one
process, plain dicts. Nothing here is durable: the database stays the truth. A Redis that is flushed or
down loses recheck flags (the heartbeat flush finds ended leases again, `coordinator/heartbeat_flush.py`)
and wake-ups (long-polls end at their timeout and claim again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

from coordinator.background import cancel_and_wait
from coordinator.worker_tokens import HEARD_FRESH_S, STALE_S, WorkerTokenCache

log = logging.getLogger(__name__)
WAKE_CHANNEL = "tg:wake"
REVOKE_CHANNEL = "tg:revoked"  # a worker id whose token was revoked: every process evicts it from its cache
REDIS_TIMEOUT_S = 2.0
HEARTBEAT_KEEP_S = 3600
RECHECK_CHANNEL = "tg:recheck"  # a worker id whose next heartbeat must read the database
RECHECK_PREFIX = "tg:recheck:"  # the same, kept for processes that subscribe later
RECHECK_KEEP_S = 120  # longer than a process takes to subscribe again; past it the heartbeat flush finds ended leases
RECHECKS_PRUNE_S = 60.0  # how often flags older than `RECHECK_KEEP_S` (and a minute) are dropped
SNAPSHOT_PREFIX = "tg:hb:"
SNAPSHOT_WRITE_S = 0.25  # heartbeat snapshots reach Redis this often, in one round trip
HISTORY_PREFIX = "tg:hbh:"
TOKEN_PREFIX = "tg:wtok:"  # a worker token's prefix -> "<worker id> <sha256 of its secret>", for a minute
REVOKE_ATTEMPTS = 3
HISTORY_LENGTH = 30  # recent heartbeats kept per worker, for the dashboard's sparklines


def announce_recheck(pipe: Any, worker_id: str) -> None:
    """Onto a Redis pipeline (async or not): make this worker's next heartbeat, in any process, read the database."""
    pipe.set(f"{RECHECK_PREFIX}{worker_id}", b"1", ex=RECHECK_KEEP_S)
    pipe.publish(RECHECK_CHANNEL, worker_id)


class Waiter:
    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        """True when woken, False on timeout."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        return True


class HotState(ABC):
    def __init__(self) -> None:
        self._waiters: dict[str, set[Waiter]] = {}
        self.tokens = WorkerTokenCache()  # this process's own confirmations (worker_tokens.py)

    async def start(self) -> None:  # noqa: B027 - optional hook
        pass

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass

    @abstractmethod
    async def heartbeat(self, worker_id: str, snapshot: bytes) -> bool:
        """Keep the latest heartbeat; True when the worker must re-read its lease (a recheck was asked)."""

    # Worker tokens the database confirmed lately, shared by every API process (api/deps.py): a worker's first
    # call to a process that has not seen its token needs no database connection. Keyed by the token's public
    # prefix, so a revocation (which knows the prefix, never the token) removes it. One process alone: nothing.
    async def token_owner(self, prefix: str) -> tuple[str, str] | None:
        """(worker id, sha256 of the token's secret) confirmed within the last `ttl_s` given, or None."""
        return None

    async def remember_token(self, prefix: str, secret_sha256: str, worker_id: str, ttl_s: float) -> None:  # noqa: B027
        pass

    async def forget_token(self, prefix: str) -> None:  # noqa: B027
        pass

    async def revoke_token(self, prefix: str, worker_id: str) -> None:
        """After a revocation committed: this process's cache and hot state forget the token, and every other
        process hears of it."""
        self.tokens.revoked(worker_id)
        await self.forget_token(prefix)

    @abstractmethod
    async def recheck(self, worker_ids: Iterable[str]) -> None:
        """Make these workers' next heartbeat read the database (their lease changed under them)."""

    @abstractmethod
    async def wake(self, worker_ids: Iterable[str]) -> None:
        """Wake these workers' long-polls, in whichever process they wait."""

    @abstractmethod
    async def latest(self, worker_ids: list[str]) -> dict[str, bytes]:
        """The latest heartbeat snapshots known for these workers."""

    @abstractmethod
    async def history(self, worker_ids: list[str]) -> dict[str, list[bytes]]:
        """Each worker's recent heartbeat snapshots, newest first (at most HISTORY_LENGTH)."""

    @asynccontextmanager
    async def waiter(self, worker_id: str) -> AsyncIterator[Waiter]:
        """Register before checking the database, then wait: a wake between the two is not lost."""
        waiter = Waiter()
        self._waiters.setdefault(worker_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            waiters = self._waiters.get(worker_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[worker_id]

    def _wake_local(self, worker_id: str) -> None:
        for waiter in self._waiters.get(worker_id, ()):
            waiter.set()


class MemoryHotState(HotState):
    def __init__(self) -> None:
        super().__init__()
        self._snapshots: dict[str, bytes] = {}
        self._history: dict[str, deque[bytes]] = {}
        self._recheck: set[str] = set()

    async def heartbeat(self, worker_id: str, snapshot: bytes) -> bool:
        self._snapshots[worker_id] = snapshot
        self._history.setdefault(worker_id, deque(maxlen=HISTORY_LENGTH)).appendleft(snapshot)
        if worker_id in self._recheck:
            self._recheck.discard(worker_id)
            return True
        return False

    async def recheck(self, worker_ids: Iterable[str]) -> None:
        self._recheck.update(worker_ids)

    async def wake(self, worker_ids: Iterable[str]) -> None:
        for worker_id in worker_ids:
            self._wake_local(worker_id)

    async def latest(self, worker_ids: list[str]) -> dict[str, bytes]:
        return {w: self._snapshots[w] for w in worker_ids if w in self._snapshots}

    async def history(self, worker_ids: list[str]) -> dict[str, list[bytes]]:
        return {w: list(self._history[w]) for w in worker_ids if w in self._history}


class RedisHotState(HotState):
    """Shared through Redis, with a heartbeat that never waits for it: snapshots are written in the background a
    few times a second, and the flags that make a worker's next heartbeat read the database arrive over pub/sub
    into this process's memory. Each flag is also kept in Redis for `RECHECK_KEEP_S`, so a process that
    subscribes (at start, or back after losing Redis) takes the recent ones it may have missed. While the
    subscription is down, every heartbeat reads the database."""

    def __init__(self, url: str) -> None:
        super().__init__()
        import redis.asyncio as redis

        self._redis = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
                                           health_check_interval=30)
        self._listener: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._unwritten: dict[str, list[bytes]] = {}  # worker id -> snapshots not yet in Redis, oldest first
        self._listening = False
        self._rechecks: dict[str, float] = {}  # worker id -> when its recheck was heard
        self._rechecks_pruned = time.monotonic()

    @property
    def client(self) -> Any:
        """The shared async Redis client (the rate limiter counts in it too)."""
        return self._redis

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="hotstate-listener")
        self._writer = asyncio.create_task(self._write_snapshots(), name="hotstate-writer")

    async def close(self) -> None:
        await cancel_and_wait(self._listener)
        await cancel_and_wait(self._writer)
        await self._write_unwritten()
        await self._redis.aclose()

    async def _listen(self) -> None:
        """One subscription per process; reconnects with a bounded backoff when Redis goes away. While it is
        down, tokens are trusted only briefly and heartbeats read the database; once it is back, every cached
        token is checked again and the recheck flags of the last `RECHECK_KEEP_S` are loaded (a revocation or
        a recheck may have been announced meanwhile)."""
        backoff = 0.1
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await self._subscribed(pubsub)
                    self.tokens.clear()
                    self.tokens.revocations_heard = True
                    async for key in self._redis.scan_iter(match=f"{RECHECK_PREFIX}*", count=1000):
                        self._heard(RECHECK_CHANNEL.encode(), key.decode().removeprefix(RECHECK_PREFIX))
                    self._listening = True
                    backoff = 0.1
                    async for message in pubsub.listen():
                        if message and message.get("type") == "message":
                            self._heard(message["channel"], message["data"].decode())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis down: long-polls fall back to their timeout
                log.warning("hot state listener lost Redis (%s); retrying in %.1f s", exc.__class__.__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                self._listening = False
                self.tokens.revocations_heard = False

    async def _subscribed(self, pubsub: Any) -> None:
        """Subscribe, and return once Redis has confirmed every channel: only from then on is every message
        heard, so only then may the token cache start afresh (a revocation in between would be missed)."""
        channels = (WAKE_CHANNEL, REVOKE_CHANNEL, RECHECK_CHANNEL)
        await pubsub.subscribe(*channels)
        confirmed: set[bytes] = set()
        deadline = time.monotonic() + REDIS_TIMEOUT_S
        while len(confirmed) < len(channels):
            if time.monotonic() > deadline:
                raise TimeoutError("Redis did not confirm the subscriptions")
            message = await pubsub.get_message(timeout=REDIS_TIMEOUT_S)
            if message and message.get("type") == "subscribe":
                confirmed.add(message["channel"])
            elif message and message.get("type") == "message":
                self._heard(message["channel"], message["data"].decode())

    def _heard(self, channel: bytes, worker_id: str) -> None:
        if channel == REVOKE_CHANNEL.encode():
            self.tokens.revoked(worker_id)
        elif channel == RECHECK_CHANNEL.encode():
            now = time.monotonic()
            if now - self._rechecks_pruned > RECHECKS_PRUNE_S:  # flags another process consumed stay here: age them out
                self._rechecks = {w: at for w, at in self._rechecks.items() if now - at < RECHECK_KEEP_S + 60}
                self._rechecks_pruned = now
            self._rechecks[worker_id] = now
        else:
            self._wake_local(worker_id)

    async def heartbeat(self, worker_id: str, snapshot: bytes) -> bool:
        unwritten = self._unwritten.setdefault(worker_id, [])
        unwritten.append(snapshot)
        del unwritten[:-HISTORY_LENGTH]
        if not self._listening:  # a recheck could not be heard
            return True
        return self._rechecks.pop(worker_id, None) is not None

    async def _write_snapshots(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_WRITE_S)
            await self._write_unwritten()

    async def _write_unwritten(self) -> None:
        """One pipelined round trip for every snapshot received since the last; dropped if Redis is away (hot
        state is a cache: the dashboard shows the next ones)."""
        batch, self._unwritten = self._unwritten, {}
        if not batch:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for worker_id, snapshots in batch.items():
                    pipe.set(f"{SNAPSHOT_PREFIX}{worker_id}", snapshots[-1], ex=HEARTBEAT_KEEP_S)
                    pipe.lpush(f"{HISTORY_PREFIX}{worker_id}", *snapshots)
                    pipe.ltrim(f"{HISTORY_PREFIX}{worker_id}", 0, HISTORY_LENGTH - 1)
                    pipe.expire(f"{HISTORY_PREFIX}{worker_id}", HEARTBEAT_KEEP_S)
                await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - a cache; the database holds the truth
            log.warning("%d heartbeat snapshots not kept in Redis (%s)", len(batch), exc.__class__.__name__)

    async def _each(self, worker_ids: Iterable[str], command: Callable[[Any, str], object], what: str) -> bool:
        """One pipelined round trip of `command(pipe, worker_id)` per worker; False when Redis failed."""
        ids = list(worker_ids)
        if not ids:
            return True
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for worker_id in ids:
                    command(pipe, worker_id)
                await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - hot state only speeds things up; callers degrade
            log.warning("%s not sent (%s)", what, exc.__class__.__name__)
            return False
        return True

    async def recheck(self, worker_ids: Iterable[str]) -> None:
        # On failure the heartbeat flush finds the ended leases again.
        await self._each(worker_ids, announce_recheck, "recheck")

    async def wake(self, worker_ids: Iterable[str]) -> None:
        ids = list(worker_ids)
        if not await self._each(ids, lambda pipe, w: pipe.publish(WAKE_CHANNEL, w), "wake-up"):
            for worker_id in ids:  # wake locally at least; other processes' long-polls end at their timeout
                self._wake_local(worker_id)

    async def latest(self, worker_ids: list[str]) -> dict[str, bytes]:
        if not worker_ids:
            return {}
        try:
            values = await self._redis.mget([f"{SNAPSHOT_PREFIX}{w}" for w in worker_ids])
        except Exception:  # noqa: BLE001 - hot state is a cache
            return {}
        found = {w: v for w, v in zip(worker_ids, values, strict=True) if v is not None}
        return found | {w: self._unwritten[w][-1] for w in worker_ids if self._unwritten.get(w)}

    async def token_owner(self, prefix: str) -> tuple[str, str] | None:
        try:
            value = await self._redis.get(f"{TOKEN_PREFIX}{prefix}")
        except Exception:  # noqa: BLE001 - hot state is a cache: the database decides
            return None
        if not value:
            return None
        worker_id, _, digest = value.decode().partition(" ")
        return (worker_id, digest) if worker_id and digest else None

    async def remember_token(self, prefix: str, secret_sha256: str, worker_id: str, ttl_s: float) -> None:
        with contextlib.suppress(Exception):  # a cache: without it the next process asks the database
            await self._redis.set(f"{TOKEN_PREFIX}{prefix}", f"{worker_id} {secret_sha256}", px=int(ttl_s * 1000))

    async def forget_token(self, prefix: str) -> None:
        try:
            await self._redis.delete(f"{TOKEN_PREFIX}{prefix}")
        except Exception:  # noqa: BLE001 - the entry lapses on its own within its ttl
            log.warning("a revoked worker token could not be dropped from Redis; it lapses within a minute")

    async def revoke_token(self, prefix: str, worker_id: str) -> None:
        await super().revoke_token(prefix, worker_id)
        failure = ""
        for attempt in range(REVOKE_ATTEMPTS):
            try:
                await self._redis.publish(REVOKE_CHANNEL, worker_id)
                return
            except Exception as exc:  # noqa: BLE001 - retried; the revocation itself has committed
                failure = exc.__class__.__name__
                await asyncio.sleep(0.2 * 2 ** attempt)
        log.error("worker %s's revocation could not be announced (%s): other API processes may accept its token "
                  "for up to %.0f s more", worker_id, failure, HEARD_FRESH_S + STALE_S)

    async def history(self, worker_ids: list[str]) -> dict[str, list[bytes]]:
        if not worker_ids:
            return {}
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for w in worker_ids:
                    pipe.lrange(f"{HISTORY_PREFIX}{w}", 0, HISTORY_LENGTH - 1)
                values = await pipe.execute()
        except Exception:  # noqa: BLE001 - hot state is a cache
            return {}
        found = {w: v for w, v in zip(worker_ids, values, strict=True) if v}
        for w in worker_ids:  # what this process received since its last write, newest first
            if self._unwritten.get(w):
                found[w] = (self._unwritten[w][::-1] + found.get(w, []))[:HISTORY_LENGTH]
        return found


def make_hot_state(redis_url: str | None) -> HotState:
    return RedisHotState(redis_url) if redis_url else MemoryHotState()

"""Hot state in memory (embedded) and in Redis (shared by API processes): heartbeat write throttling,
rechecks, and long-poll wake-ups across processes; a Redis that goes away degrades, never fails."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from coordinator.hotstate import HotState, MemoryHotState, RedisHotState


def worker_id() -> str:
    return f"wrk-test-{secrets.token_hex(6)}"


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def listening(*states: HotState) -> None:
    """Until each Redis hot state's subscription is up (memory ones have none)."""
    deadline = asyncio.get_running_loop().time() + 5
    while not all(getattr(h, "_listening", True) for h in states):
        assert asyncio.get_running_loop().time() < deadline, "never subscribed"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_recheck_makes_the_next_heartbeat_and_only_that_one_read_the_database(kind: str, request: pytest.FixtureRequest) -> None:
    async def scenario() -> None:
        hot: HotState = MemoryHotState() if kind == "memory" else RedisHotState(request.getfixturevalue("redis_url"))
        await hot.start()
        await listening(hot)
        w = worker_id()
        assert await hot.heartbeat(w, b"1") is False
        assert (await hot.latest([w, "nobody"])) == {w: b"1"}
        await hot.recheck([w])  # its lease changed: the next heartbeat must read the database
        await asyncio.sleep(0.1)  # (over pub/sub, with Redis)
        assert await hot.heartbeat(w, b"2") is True
        assert await hot.heartbeat(w, b"3") is False
        assert (await hot.latest([w])) == {w: b"3"}
        await hot.close()
    run(scenario())


def test_a_recheck_asked_in_one_process_reaches_a_heartbeat_in_another_and_snapshots_are_shared(redis_url: str) -> None:
    """The heartbeat never waits for Redis: flags arrive over pub/sub, snapshots are written a few times a
    second, in one round trip, and every process (the dashboard's) reads them, the last few in order."""
    async def scenario() -> None:
        a, b = RedisHotState(redis_url), RedisHotState(redis_url)
        for hot in (a, b):
            await hot.start()
        await listening(a, b)
        w = worker_id()
        assert await b.heartbeat(w, b"1") is False
        await asyncio.sleep(0.5)  # (two processes' snapshots of one worker within a write interval may land in either order)
        assert await a.heartbeat(w, b"2") is False
        await b.recheck([w])
        await asyncio.sleep(0.1)
        assert await a.heartbeat(w, b"3") is True
        await asyncio.sleep(0.5)  # the writers' turn
        assert await b.latest([w]) == {w: b"3"}
        assert (await b.history([w]))[w][:2] == [b"3", b"2"]
        for hot in (a, b):
            await hot.close()
        late = RedisHotState(redis_url)  # a process that subscribes after the recheck was announced still hears it
        await late.start()
        await listening(late)
        assert await late.heartbeat(w, b"4") is True
        await late.close()
    run(scenario())


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_wake_in_one_process_ends_a_long_poll_in_another(kind: str, request: pytest.FixtureRequest) -> None:
    async def scenario() -> None:
        if kind == "memory":
            a = b = MemoryHotState()
        else:
            url = request.getfixturevalue("redis_url")
            a, b = RedisHotState(url), RedisHotState(url)
            await a.start()
            await b.start()
            await asyncio.sleep(0.1)
        w = worker_id()
        async with a.waiter(w) as waiter:
            loop = asyncio.get_running_loop()
            started = loop.time()
            asyncio.get_running_loop().call_later(0.05, lambda: asyncio.ensure_future(b.wake([w])))
            assert await waiter.wait(5) is True
            assert loop.time() - started < 1
        async with a.waiter(w) as waiter:
            assert await waiter.wait(0.1) is False  # nobody woke it
        await a.close()
        if b is not a:
            await b.close()
    run(scenario())


def test_without_redis_heartbeats_fall_back_to_the_database_and_wakes_stay_local() -> None:
    async def scenario() -> None:
        hot = RedisHotState("redis://127.0.0.1:1/0")  # nothing listens there
        await hot.start()
        w = worker_id()
        assert await hot.heartbeat(w, b"x") is True  # every time: without Redis the database must answer
        assert await hot.heartbeat(w, b"x") is True
        async with hot.waiter(w) as waiter:
            await hot.wake([w])
            assert await waiter.wait(1) is True
        await asyncio.sleep(0.5)  # the writer tries, fails and drops them
        assert await hot.latest([w]) == {}
        await hot.recheck([w])
        await hot.close()
    run(scenario())

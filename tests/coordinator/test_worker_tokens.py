"""The API process's worker-token cache: how long a confirmation is trusted with and without revocations heard,
and no confirmation outliving a revocation, not even one whose database read was under way when it came."""

from __future__ import annotations

import asyncio
import time

from coordinator import worker_tokens
from coordinator.hotstate import MemoryHotState, RedisHotState
from coordinator.worker_tokens import WorkerTokenCache


def test_a_confirmation_is_fresh_then_due_for_a_check_then_gone() -> None:
    cache = WorkerTokenCache()
    cache.confirm("d", "wrk-1", 100.0)
    assert cache.lookup("d", 100.0 + worker_tokens.FRESH_S - 1) == ("wrk-1", False)
    assert cache.lookup("d", 100.0 + worker_tokens.FRESH_S + 1) == ("wrk-1", True)
    assert cache.lookup("d", 100.0 + worker_tokens.FRESH_S + worker_tokens.STALE_S + 1) == (None, False)
    assert cache.lookup("other", 100.0) == (None, False)


def test_heard_revocations_let_a_confirmation_stay_fresh_longer() -> None:
    cache = WorkerTokenCache()
    cache.revocations_heard = True
    cache.confirm("d", "wrk-1", 100.0)
    assert cache.lookup("d", 100.0 + worker_tokens.FRESH_S + 1) == ("wrk-1", False)
    assert cache.lookup("d", 100.0 + worker_tokens.HEARD_FRESH_S + 1) == ("wrk-1", True)
    cache.revocations_heard = False  # the subscription dropped: short windows again
    assert cache.lookup("d", 100.0 + worker_tokens.FRESH_S + 1) == ("wrk-1", True)


def test_a_revocation_evicts_every_token_of_its_worker_and_refuses_older_checks() -> None:
    cache = WorkerTokenCache()
    began = time.monotonic()
    cache.confirm("a", "wrk-1", began)
    cache.confirm("b", "wrk-2", began)
    cache.revoked("wrk-1")
    assert cache.lookup("a", time.monotonic()) == (None, False)
    assert cache.lookup("b", time.monotonic())[0] == "wrk-2"
    assert cache.confirm("a", "wrk-1", began) is False  # a check that read the database before the revocation:
    assert cache.lookup("a", time.monotonic()) == (None, False)  # not kept, and not shared through Redis either
    assert cache.heard_revoked("wrk-1") and not cache.heard_revoked("wrk-2")


def test_after_a_clear_a_check_begun_before_it_is_not_kept() -> None:
    """Back on Redis after a gap: any revocation announced meanwhile was missed, so reads begun before count for nothing."""
    cache = WorkerTokenCache()
    began = time.monotonic()
    cache.confirm("a", "wrk-1", began)
    cache.clear()
    assert len(cache) == 0
    cache.confirm("a", "wrk-1", began)
    assert len(cache) == 0
    cache.confirm("a", "wrk-1", time.monotonic())
    assert len(cache) == 1


def test_a_revocation_announced_by_one_process_evicts_the_token_in_another(redis_url: str) -> None:
    async def scenario() -> None:
        here, there = RedisHotState(redis_url), RedisHotState(redis_url)
        await here.start()
        await there.start()
        deadline = time.monotonic() + 5
        while not (here.tokens.revocations_heard and there.tokens.revocations_heard) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert there.tokens.revocations_heard
        there.tokens.confirm("digest", "wrk-9", time.monotonic())
        await here.revoke_token("prefix9", "wrk-9")
        while len(there.tokens) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert there.tokens.lookup("digest", time.monotonic()) == (None, False)
        await here.close()
        await there.close()
        assert not here.tokens.revocations_heard  # a closed listener hears nothing
    asyncio.run(scenario())


def test_without_redis_revocations_are_not_heard_so_windows_stay_short() -> None:
    async def scenario() -> None:
        hot = RedisHotState("redis://127.0.0.1:1/0")  # nothing listens there
        await hot.start()
        await asyncio.sleep(0.3)
        assert hot.tokens.revocations_heard is False
        hot.tokens.confirm("d", "wrk-1", time.monotonic())
        await hot.revoke_token("p", "wrk-1")  # the publish fails: logged, bounded, the local cache still drops it
        assert len(hot.tokens) == 0
        await hot.close()
    asyncio.run(scenario())


def test_memory_hot_state_never_claims_to_hear_revocations() -> None:
    """Embedded, a revocation in this process evicts at once, but another process on the same database would
    never be told: windows stay short."""
    assert MemoryHotState().tokens.revocations_heard is False

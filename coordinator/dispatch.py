"""The live side of the marketplace in each API process: applies committed effects (wake a worker,
make its next heartbeat re-read its lease) and runs placement passes as soon as jobs become placeable.

A kick coalesces: any number of jobs queued while a pass runs lead to one more pass. In embedded mode
(no Redis, so no Celery) the same loop also runs the periodic tasks of `coordinator/tasks.py` in-process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from coordinator.background import cancel_and_wait
from coordinator.effects import Effects
from coordinator.hotstate import HotState

log = logging.getLogger(__name__)
PASS_RETRY_S = 0.5


class Dispatcher:
    def __init__(
        self, *, hot: HotState, place: Callable[[], Awaitable[int]],
        periodic: Callable[[], Awaitable[None]] | None, interval_s: float,
    ) -> None:
        self.hot = hot
        self._place = place
        self._periodic = periodic
        self._interval_s = interval_s
        self._kicked: asyncio.Event | None = None  # made in start(), on the serving loop
        self._task: asyncio.Task[None] | None = None

    async def apply(self, effects: Effects) -> None:
        if effects.wake:
            await self.hot.wake(effects.wake)
        if effects.recheck:
            await self.hot.recheck(effects.recheck)
        if effects.placeable:
            self.kick()

    def kick(self) -> None:
        if self._kicked is not None:
            self._kicked.set()

    def start(self) -> None:
        self._kicked = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="dispatcher")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = self._kicked = None

    async def _run(self) -> None:
        assert self._kicked is not None
        loop = asyncio.get_running_loop()
        next_periodic = loop.time() + self._interval_s
        while True:
            timeout = max(next_periodic - loop.time(), 0) if self._periodic else None
            try:
                await asyncio.wait_for(self._kicked.wait(), timeout)
            except TimeoutError:
                pass
            try:
                if self._kicked.is_set():
                    self._kicked.clear()
                    await self._place()
                if self._periodic and loop.time() >= next_periodic:
                    next_periodic = loop.time() + self._interval_s
                    await self._periodic()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must outlive one failed pass; the next one retries
                log.exception("placement pass failed; retrying")
                self._kicked.set()
                await asyncio.sleep(PASS_RETRY_S)

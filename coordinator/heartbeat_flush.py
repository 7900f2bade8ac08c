"""Heartbeats reach the database in batches: each API process keeps the latest heartbeat per worker it
served and writes them every `heartbeat_flush_s` in a few statements (`workers.flush_heartbeats`).

The request path touches only the hot state, so thousands of workers cost a handful of writes a second.
A crash loses at most one period of liveness (never durable data): the next heartbeats renew the leases
long before `lease_ttl`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from itertools import islice

from coordinator.background import cancel_and_wait
from shared.protocol import WorkerHeartbeat

log = logging.getLogger(__name__)
Batch = dict[str, tuple[WorkerHeartbeat, datetime]]
CHUNK = 1000  # rows per transaction: short locks, bounded statements


class HeartbeatBuffer:
    def __init__(self, flush: Callable[[Batch], Awaitable[object]], interval_s: float) -> None:
        self._latest: Batch = {}
        self._flush = flush
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def add(self, worker_id: str, heartbeat: WorkerHeartbeat, received_at: datetime) -> None:
        self._latest[worker_id] = (heartbeat, received_at)

    def __len__(self) -> int:
        return len(self._latest)

    async def flush_now(self) -> int:
        batch, self._latest = self._latest, {}
        items = iter(batch.items())
        written = 0
        while chunk := dict(islice(items, CHUNK)):
            try:
                await self._flush(chunk)
                written += len(chunk)
            except Exception:  # noqa: BLE001 - one bad row must not starve the others of their renewals
                log.exception("heartbeat batch of %d failed; writing them one by one", len(chunk))
                written += await self._one_by_one(chunk)
        return written

    async def _one_by_one(self, chunk: Batch) -> int:
        written = 0
        for worker_id, entry in chunk.items():
            try:
                await self._flush({worker_id: entry})
                written += 1
            except Exception:  # noqa: BLE001 - dropped: the worker's next heartbeat replaces it
                log.exception("heartbeat of worker %s could not be written; dropped", worker_id)
        return written

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="heartbeat-flush")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self.flush_now()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.flush_now()

"""Worker tokens this API process has confirmed in the database lately, so a heartbeat need not wait for a
database connection to know who sent it; revocations evict them.

How long a confirmation is trusted depends on whether this process hears revocations. Every API process
subscribes to one Redis channel on which a revocation is announced after it commits (`HotState`); while that
subscription is up, a confirmation is trusted for `HEARD_FRESH_S`, because a revocation would have evicted it.
Without it (no Redis, or the subscription lost) only for `FRESH_S`. Past either, for `STALE_S` more, the token
is trusted while it is checked again in the background; past that, the call waits for the database.

A check that read the database before a revocation was heard must not put the token back afterwards: each
confirmation carries the time its read began, and one older than the worker's last heard revocation is dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

FRESH_S = 10.0  # without revocations heard, a token confirmed this recently is trusted outright
HEARD_FRESH_S = 300.0  # with them heard: a revocation evicts the token, so only a missed message could fool this
STALE_S = 60.0  # past the fresh window, this much longer the token is trusted while a background check runs
MAX_ENTRIES = 100_000  # a bound on memory: past it the cache starts again (every worker is checked once more)
REVOCATIONS_KEPT_S = 600.0  # how long a heard revocation is remembered against checks that began before it


@dataclass(frozen=True, slots=True)
class Confirmation:
    worker_id: str
    checked_at: float  # time.monotonic() when the database read that confirmed it began


class WorkerTokenCache:
    """Token digests (sha256 of the whole token) to the worker the database said they belong to."""

    def __init__(self) -> None:
        self._entries: dict[str, Confirmation] = {}
        self._revoked: dict[str, float] = {}  # worker id -> when this process heard of its revocation
        self._cleared_at = float("-inf")
        self.revocations_heard = False  # the owner of the subscription (the app's hot state) sets this

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, digest: str, now: float) -> tuple[str | None, bool]:
        """(worker id, whether it must be checked again in the background); (None, False) when the caller must
        wait for the database."""
        entry = self._entries.get(digest)
        if entry is None:
            return None, False
        age = now - entry.checked_at
        fresh = HEARD_FRESH_S if self.revocations_heard else FRESH_S
        if age < fresh:
            return entry.worker_id, False
        if age < fresh + STALE_S:
            return entry.worker_id, True
        return None, False

    def confirm(self, digest: str, worker_id: str, checked_at: float) -> bool:
        """Remember a confirmation whose database read began at `checked_at`, unless a revocation was heard (or
        could have been missed) since: then False, and nobody else should be told of it either."""
        if checked_at <= self._cleared_at or self._revoked.get(worker_id, float("-inf")) >= checked_at:
            return False
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[digest] = Confirmation(worker_id, checked_at)
        return True

    def heard_revoked(self, worker_id: str) -> bool:
        """Whether this worker's revocation was heard lately (another process's hot state may lag behind it)."""
        return worker_id in self._revoked

    def forget(self, digest: str) -> None:
        self._entries.pop(digest, None)

    def revoked(self, worker_id: str) -> None:
        """A worker's token was revoked (here, or announced by another process): evict it, and refuse
        confirmations of checks that began before now."""
        now = time.monotonic()
        self._revoked = {w: at for w, at in self._revoked.items() if now - at < REVOCATIONS_KEPT_S}
        self._revoked[worker_id] = now
        for digest in [d for d, e in self._entries.items() if e.worker_id == worker_id]:
            del self._entries[digest]

    def clear(self) -> None:
        """Forget every confirmation, and refuse those of checks under way: revocations may have been announced
        while this process was not listening."""
        self._cleared_at = time.monotonic()
        self._entries.clear()

"""What a lease owes the coordinator, delivered until it is acknowledged: the one retry-through-an-outage loop
of the agent (the channel itself retries a call a bounded number of times; this waits out a longer outage).

A stopping agent does not wait: what is still owed raises `Undelivered`, and the job folder and `state.json`
keep it for the next start. A lease the coordinator says is lost or refuses raises through (`LeaseLost`,
`Rejected`): waiting cannot help those.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from shared.protocol import Assignment, LeaseReply
from worker.channel import Channel, CoordinatorUnreachable

T = TypeVar("T")
DELIVERY_PAUSE_S = 5.0
EVENTS_PER_CALL = 500


class Undelivered(Exception):
    """The agent is stopping with something the coordinator has not acknowledged: kept for the next start."""


class Reporter:
    def __init__(self, channel: Channel, stop: threading.Event, *, pause_s: float = DELIVERY_PAUSE_S) -> None:
        self.channel, self._stop, self.pause_s = channel, stop, pause_s

    def until_acknowledged(self, send: Callable[[], T]) -> T:
        """`send()` again after each pause while the coordinator is unreachable; `Undelivered` once stopping."""
        while True:
            try:
                return send()
            except CoordinatorUnreachable:
                if self._stop.wait(self.pause_s):
                    raise Undelivered() from None

    def events(self, a: Assignment, events: list[dict[str, Any]]) -> None:
        """Progress events, in order, in calls of at most `EVENTS_PER_CALL` (delivered ones leave the list)."""
        while events:
            batch = events[:EVENTS_PER_CALL]
            self.until_acknowledged(lambda: self.channel.events(a.lease_id, a.fencing_token, batch))
            del events[:len(batch)]

    def finish(self, a: Assignment, outcome: str, body: dict[str, Any]) -> LeaseReply:
        """How the lease ended: `complete`, `fail` or `preempted` (idempotent on the coordinator)."""
        return self.until_acknowledged(lambda: self.channel.finish(a.lease_id, a.fencing_token, outcome, body))

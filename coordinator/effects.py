"""What a committed change asks of the live system: wake a long-polling worker, make a worker's next
heartbeat re-read its lease, run a placement pass soon.

Services run in a worker thread and know nothing of Redis or the event loop; they note effects on the
session (`effects(session).wake.add(...)`), and the request's thread hop hands them to the app after the
work returned (`coordinator.api.deps.run_in_session`). Effects only speed things up: the periodic sweeps
and the heartbeats' database reads reach the same state without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.orm import Session

_KEY = "tunegrid.effects"


@dataclass(slots=True)
class Effects:
    placeable: bool = False  # a job became queued (or a worker idle): run a placement pass
    wake: set[str] = field(default_factory=set)  # workers holding a fresh assignment
    recheck: set[str] = field(default_factory=set)  # workers whose lease changed under them (cancel, pause, lost)

    def __bool__(self) -> bool:
        return self.placeable or bool(self.wake) or bool(self.recheck)


def effects(session: Session) -> Effects:
    return session.info.setdefault(_KEY, Effects())


def take_effects(session: Session) -> Effects:
    return session.info.pop(_KEY, None) or Effects()

"""Upload tickets: the direct uploads (presigned PUTs to the object store) a lease holds open.

A ticket's URL takes one object of the declared size under its key, as often as the worker PUTs it, until the
URL expires: adopting the upload deletes the staged object, but a second PUT would write it again. So a ticket
stays open until it lapses, once its URL has expired and the bytes it allows could have gone up at
`SLOWEST_UPLINK` (a PUT begun before the expiry may still be running); then whatever is under its key is
deleted, when the lease next asks for a ticket or by the blob collection (`services/blobs.py`).

What a lease may park in the store is bounded by the tickets it holds open: their declared bytes together at
most `OPEN_UPLOADS` times the largest upload among them and the one asked for (a checkpoint and a retry of it,
an adapter, an export's formats one after the other), so never more than that many of its largest kind's limit;
and at most `MAX_OPEN_TICKETS` of them (a batch lease sends a small part every few seconds).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from coordinator.db.tables import LeaseModel, UploadTicketModel, WorkerModel, utcnow
from shared.errors import NotFound, RateLimited

OPEN_UPLOADS = 4  # uploads' worth of the asked kind's limit a lease may hold open
MAX_OPEN_TICKETS = 128
UPLOAD_URL_S = 120  # how long a ticket's URL may start a PUT (at most the lease's grace); the agent PUTs at once
SLOWEST_UPLINK = 1 << 20  # bytes/s (8 Mbit/s): a slower provider's upload may finish after its ticket lapsed


def lapses_at(expires_at: datetime, size: int) -> datetime:
    return expires_at + timedelta(seconds=size / SLOWEST_UPLINK)


def open_ticket(*, session: Session, worker: WorkerModel, lease_id: str, key: str, size: int, limit: int,
                expires_at: datetime) -> list[str]:
    """Record a ticket for `key` (`size` bytes of a kind whose uploads may be `limit` bytes; its URL expiring at
    `expires_at`), or refuse it (429) while the lease's open tickets leave no room for it. Returns the keys of
    the lease's lapsed tickets, closed here: the caller deletes whatever is under them."""
    lease = session.get(LeaseModel, lease_id, with_for_update=True)  # one count at a time per lease
    if lease is None or lease.worker_id != worker.id:
        raise NotFound(f"No such lease: {lease_id}", param="lease_id")
    now = utcnow()
    held = session.scalars(select(UploadTicketModel).where(UploadTicketModel.lease_id == lease_id)).all()
    lapsed = [t for t in held if t.lapses_at <= now]
    live = [t for t in held if t.lapses_at > now]
    room = OPEN_UPLOADS * max([limit] + [t.bytes for t in live])  # an export's later, smaller formats fit
    if len(live) >= MAX_OPEN_TICKETS or sum(t.bytes for t in live) + size > room:
        wait = min(t.lapses_at for t in live) - now
        raise RateLimited(
            "This lease's open uploads leave no room for another (each stays open until its URL expires); "
            "send what was asked for and try again later.", retry_after_s=max(1, int(wait.total_seconds()) + 1))
    for ticket in lapsed:
        session.delete(ticket)
    session.add(UploadTicketModel(key=key, lease_id=lease_id, bytes=size, lapses_at=lapses_at(expires_at, size)))
    session.commit()
    return [t.key for t in lapsed]


def lapsed_tickets(*, session: Session, limit: int) -> list[str]:
    """Close up to `limit` lapsed tickets (the caller commits, then deletes their objects); their keys."""
    keys = list(session.scalars(select(UploadTicketModel.key).where(UploadTicketModel.lapses_at <= utcnow())
                                .order_by(UploadTicketModel.lapses_at).limit(limit)))
    if keys:
        session.execute(delete(UploadTicketModel).where(UploadTicketModel.key.in_(keys)))
    return keys

"""Upload tickets: the direct uploads (presigned PUTs to the object store) a lease holds open.

A lease may hold `OPEN_TICKETS` at a time. Each takes at most its kind's size limit, so no worker can park more
than that many uploads' bytes in the store, whatever pace its uplink allows. A ticket closes when its upload is
adopted (the store deletes the staged object either way), or lapses: what it may have written is deleted when the
lease next asks for one, or by the blob collection (`services/blobs.py`). It lapses once its URL has expired and
the bytes it allows could have gone up at `SLOWEST_UPLINK` (a PUT begun before the expiry may still be running).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from coordinator.db.tables import LeaseModel, UploadTicketModel, WorkerModel, utcnow
from shared.errors import NotFound, RateLimited

OPEN_TICKETS = 4  # a checkpoint and a retry of it, an adapter, a batch part: more than one lease needs at once
SLOWEST_UPLINK = 1 << 20  # bytes/s (8 Mbit/s); a slower provider's upload may be deleted under it


def lapses_at(expires_at: datetime, size: int) -> datetime:
    return expires_at + timedelta(seconds=size / SLOWEST_UPLINK)


def open_ticket(*, session: Session, worker: WorkerModel, lease_id: str, key: str, size: int,
                expires_at: datetime) -> list[str]:
    """Record a ticket for `key` (its URL expiring at `expires_at`), or refuse it (429) while the lease holds
    `OPEN_TICKETS` that have not lapsed. Returns the keys of the lease's lapsed tickets, closed here: the caller
    deletes whatever was written under them."""
    lease = session.get(LeaseModel, lease_id, with_for_update=True)  # one count at a time per lease
    if lease is None or lease.worker_id != worker.id:
        raise NotFound(f"No such lease: {lease_id}", param="lease_id")
    now = utcnow()
    held = session.scalars(select(UploadTicketModel).where(UploadTicketModel.lease_id == lease_id)).all()
    lapsed = [t for t in held if t.lapses_at <= now]
    live = [t for t in held if t.lapses_at > now]
    if len(live) >= OPEN_TICKETS:
        wait = min(t.lapses_at for t in live) - now
        raise RateLimited(
            f"This lease already holds {OPEN_TICKETS} open uploads; send one of them (or wait for one to expire) "
            "before asking for another.", retry_after_s=max(1, int(wait.total_seconds()) + 1))
    for ticket in lapsed:
        session.delete(ticket)
    session.add(UploadTicketModel(key=key, lease_id=lease_id, bytes=size, lapses_at=lapses_at(expires_at, size)))
    session.commit()
    return [t.key for t in lapsed]


def close_ticket(*, session: Session, worker: WorkerModel, key: str) -> None:
    """Its upload was adopted, or refused and deleted: the lease may open another."""
    session.execute(delete(UploadTicketModel).where(UploadTicketModel.key == key))
    session.commit()


def lapsed_tickets(*, session: Session, limit: int) -> list[str]:
    """Close up to `limit` lapsed tickets (the caller commits, then deletes their objects); their keys."""
    keys = list(session.scalars(select(UploadTicketModel.key).where(UploadTicketModel.lapses_at <= utcnow())
                                .order_by(UploadTicketModel.lapses_at).limit(limit)))
    if keys:
        session.execute(delete(UploadTicketModel).where(UploadTicketModel.key.in_(keys)))
    return keys

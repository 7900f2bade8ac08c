"""`coordinator/services/uploads.py` on a real database: the tickets a lease holds open bound what it can park in
the store (their bytes together, and their number); a ticket stays open until it lapses, whatever was adopted
meanwhile, and a lapsed one frees its room and is handed back for its object's deletion; a ticket lapses only
once its bytes could have gone up at the slowest uplink allowed; another worker's lease is not found.
(Over HTTP, with the object store itself: tests/coordinator/api/test_downloads.py.)"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from coordinator.db.tables import UploadTicketModel, utcnow
from coordinator.services import uploads
from shared.errors import NotFound, RateLimited

LIMIT = 10_000  # what one upload of the kind may be


@pytest.fixture
def lease(new_job, service_agent):  # type: ignore[no-untyped-def]
    new_job()
    agent = service_agent()
    assignment = agent.claim()
    assert assignment is not None
    return agent, assignment.lease_id


def _open(session: Session, agent, lease_id: str, key: str, *, expires_in_s: float = 120, size: int = LIMIT):  # type: ignore[no-untyped-def]
    return uploads.open_ticket(session=session, worker=agent.worker, lease_id=lease_id, key=key, size=size,
                               limit=LIMIT, expires_at=utcnow() + timedelta(seconds=expires_in_s))


def test_open_tickets_hold_a_few_uploads_worth_of_bytes_and_no_more(session: Session, lease) -> None:  # type: ignore[no-untyped-def]
    agent, lease_id = lease
    for i in range(uploads.OPEN_UPLOADS):
        assert _open(session, agent, lease_id, f"incoming/{lease_id}/adapter-{i}") == []
    with pytest.raises(RateLimited) as refused:
        _open(session, agent, lease_id, f"incoming/{lease_id}/adapter-x", size=1)
    assert 1 <= refused.value.retry_after_s <= 122
    session.rollback()


def test_many_small_uploads_fit_up_to_a_count(session: Session, lease) -> None:  # type: ignore[no-untyped-def]
    """A batch lease sends a small part every few seconds: bytes allow many, the count stops them somewhere."""
    agent, lease_id = lease
    for i in range(uploads.MAX_OPEN_TICKETS):
        _open(session, agent, lease_id, f"incoming/{lease_id}/batch-{i}", size=10)
    with pytest.raises(RateLimited):
        _open(session, agent, lease_id, f"incoming/{lease_id}/batch-x", size=10)
    session.rollback()


def test_a_lapsed_ticket_frees_its_room_and_is_handed_back_for_deletion(session: Session, lease) -> None:  # type: ignore[no-untyped-def]
    agent, lease_id = lease
    for i in range(uploads.OPEN_UPLOADS - 1):
        _open(session, agent, lease_id, f"incoming/{lease_id}/adapter-{i}")
    _open(session, agent, lease_id, f"incoming/{lease_id}/adapter-old", expires_in_s=-3600)
    assert _open(session, agent, lease_id, f"incoming/{lease_id}/adapter-new") == [f"incoming/{lease_id}/adapter-old"]
    assert session.get(UploadTicketModel, f"incoming/{lease_id}/adapter-old") is None
    with pytest.raises(RateLimited):  # the new one took the lapsed one's room, no more
        _open(session, agent, lease_id, f"incoming/{lease_id}/adapter-more")
    session.rollback()


def test_a_big_upload_keeps_its_ticket_while_its_bytes_may_still_be_going_up(session: Session, lease) -> None:  # type: ignore[no-untyped-def]
    """A PUT begun just before its URL expired may still be running: 600 MiB at 1 MiB/s is ten minutes more."""
    agent, lease_id = lease
    uploads.open_ticket(session=session, worker=agent.worker, lease_id=lease_id, key=f"incoming/{lease_id}/export-big",
                        size=600 << 20, limit=1 << 30, expires_at=utcnow() - timedelta(seconds=60))
    assert uploads.lapsed_tickets(session=session, limit=10) == []
    uploads.open_ticket(session=session, worker=agent.worker, lease_id=lease_id,
                        key=f"incoming/{lease_id}/export-small", size=1000, limit=1 << 30,
                        expires_at=utcnow() - timedelta(seconds=60))
    assert uploads.lapsed_tickets(session=session, limit=10) == [f"incoming/{lease_id}/export-small"]


def test_an_exports_smaller_formats_fit_beside_its_bigger_ones_still_open(session: Session, lease) -> None:  # type: ignore[no-untyped-def]
    """The merged model, then the GGUF files: each smaller than the last, each its own limit; the room is a few
    of the largest, so the last one is not refused for the bigger ones' URLs still being open."""
    agent, lease_id = lease
    for size, fmt in ((2500, "merged"), (1300, "q8_0"), (800, "q4_k_m")):
        uploads.open_ticket(session=session, worker=agent.worker, lease_id=lease_id,
                            key=f"incoming/{lease_id}/export-{fmt}", size=size, limit=size + 100,
                            expires_at=utcnow() + timedelta(seconds=120))


def test_another_workers_lease_is_not_found(session: Session, lease, service_agent) -> None:  # type: ignore[no-untyped-def]
    _, lease_id = lease
    stranger = service_agent("pc-2")
    with pytest.raises(NotFound):
        _open(session, stranger, lease_id, f"incoming/{lease_id}/adapter-0")

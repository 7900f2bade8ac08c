"""`coordinator/services/uploads.py` on a real database: a lease holds at most `OPEN_TICKETS` direct uploads; a
closed ticket frees its place, a lapsed one too (and is handed back for its object's deletion); a ticket lapses
only once its bytes could have gone up at the slowest uplink allowed; another worker's lease is not found.
(Over HTTP, with the object store itself: tests/coordinator/api/test_downloads.py.)"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from coordinator.db.tables import UploadTicketModel, utcnow
from coordinator.services import uploads
from shared.errors import NotFound, RateLimited


@pytest.fixture
def lease(new_job, service_agent):  # type: ignore[no-untyped-def]
    new_job()
    agent = service_agent()
    assignment = agent.claim()
    assert assignment is not None
    return agent, assignment.lease_id


def _open(session: Session, agent, lease_id: str, key: str, *, expires_in_s: float = 300, size: int = 1000):  # type: ignore[no-untyped-def]
    return uploads.open_ticket(session=session, worker=agent.worker, lease_id=lease_id, key=key, size=size,
                               expires_at=utcnow() + timedelta(seconds=expires_in_s))


def test_a_lease_holds_a_few_open_tickets_and_a_closed_one_frees_its_place(session: Session, lease) -> None:  # type: ignore[no-untyped-def]
    agent, lease_id = lease
    for i in range(uploads.OPEN_TICKETS):
        assert _open(session, agent, lease_id, f"incoming/{lease_id}/adapter-{i}") == []
    with pytest.raises(RateLimited) as refused:
        _open(session, agent, lease_id, f"incoming/{lease_id}/adapter-x")
    assert 1 <= refused.value.retry_after_s <= 302
    session.rollback()
    uploads.close_ticket(session=session, worker=agent.worker, key=f"incoming/{lease_id}/adapter-0")
    assert _open(session, agent, lease_id, f"incoming/{lease_id}/adapter-x") == []


def test_a_lapsed_ticket_frees_its_place_and_is_handed_back_for_deletion(session: Session, lease) -> None:  # type: ignore[no-untyped-def]
    agent, lease_id = lease
    for i in range(uploads.OPEN_TICKETS - 1):
        _open(session, agent, lease_id, f"incoming/{lease_id}/adapter-{i}")
    _open(session, agent, lease_id, f"incoming/{lease_id}/adapter-old", expires_in_s=-3600)
    assert _open(session, agent, lease_id, f"incoming/{lease_id}/adapter-new") == [f"incoming/{lease_id}/adapter-old"]
    assert session.get(UploadTicketModel, f"incoming/{lease_id}/adapter-old") is None
    with pytest.raises(RateLimited):  # the new one took the lapsed one's place, no more
        _open(session, agent, lease_id, f"incoming/{lease_id}/adapter-more")


def test_a_big_upload_keeps_its_ticket_while_its_bytes_may_still_be_going_up(session: Session, lease) -> None:  # type: ignore[no-untyped-def]
    """A PUT begun just before its URL expired may still be running: 600 MiB at 1 MiB/s is ten minutes more."""
    agent, lease_id = lease
    _open(session, agent, lease_id, f"incoming/{lease_id}/export-big", expires_in_s=-60, size=600 << 20)
    assert uploads.lapsed_tickets(session=session, limit=10) == []
    _open(session, agent, lease_id, f"incoming/{lease_id}/export-small", expires_in_s=-60, size=1000)
    assert uploads.lapsed_tickets(session=session, limit=10) == [f"incoming/{lease_id}/export-small"]


def test_another_workers_lease_is_not_found(session: Session, lease, service_agent) -> None:  # type: ignore[no-untyped-def]
    _, lease_id = lease
    stranger = service_agent("pc-2")
    with pytest.raises(NotFound):
        _open(session, stranger, lease_id, f"incoming/{lease_id}/adapter-0")

"""The outbox as a queue: a call is a row committed with the change that needs it; an answer settles it once,
no answer schedules the next attempt with a doubling, capped backoff, and after the last attempt it gives up
as a refusal its subject hears. (Making the calls and applying answers: test_stripe_sync.py.)"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from coordinator.db.tables import OutboxModel, OutboxStatus, utcnow
from coordinator.services import outbox
from coordinator.services.outbox import Answer
from coordinator.stripe_gateway import StripeRefused


def queued(session: Session, key: str = "topup-1") -> str:
    row = outbox.enqueue(session=session, operation="checkout.session.create", key=key, subject_id="topup-1",
                         params={"mode": "payment"})
    session.commit()
    return row.id


def test_only_known_stripe_operations_can_be_queued(session: Session) -> None:
    with pytest.raises(ValueError, match="unknown Stripe operation"):
        outbox.enqueue(session=session, operation="charges.create", key="k", subject_id="x", params={})


def test_a_pending_call_is_handed_out_until_it_is_answered(session: Session) -> None:
    row_id = queued(session)
    call = outbox.pending_call(session=session, row_id=row_id)
    assert call is not None and call.operation == "checkout.session.create" and call.key == "topup-1"
    settled = outbox.record(session=session, row_id=row_id, answer=Answer(result={"id": "cs_1"}))
    session.commit()
    assert settled is not None and settled.result == {"id": "cs_1"} and settled.refused is None
    row = session.get(OutboxModel, row_id)
    assert row is not None and row.status is OutboxStatus.done and row.response == {"id": "cs_1"} and row.attempts == 1
    assert outbox.pending_call(session=session, row_id=row_id) is None
    # A second answer for the same row (another process, a retried request) settles nothing.
    assert outbox.record(session=session, row_id=row_id, answer=Answer(result={"id": "cs_2"})) is None
    session.commit()
    assert session.get(OutboxModel, row_id).response == {"id": "cs_1"}  # type: ignore[union-attr]


def test_a_refusal_settles_the_call_as_failed_for_its_subject_to_hear(session: Session) -> None:
    row_id = queued(session)
    refused = StripeRefused("card declined", code="card_declined")
    settled = outbox.record(session=session, row_id=row_id, answer=Answer(refused=refused, error="refused: card declined"))
    session.commit()
    assert settled is not None and settled.refused is refused and settled.result is None
    assert session.get(OutboxModel, row_id).status is OutboxStatus.failed  # type: ignore[union-attr]


def test_no_answer_backs_off_doubling_up_to_the_cap_then_gives_up(session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox, "MAX_ATTEMPTS", 5)
    monkeypatch.setattr(outbox, "BACKOFF_MAX_S", 100)
    row_id = queued(session)
    delays = []
    for _ in range(4):
        before = utcnow()
        assert outbox.record(session=session, row_id=row_id, answer=Answer(error="timeout")) is None
        session.commit()
        row = session.get(OutboxModel, row_id)
        assert row is not None and row.status is OutboxStatus.pending and row.last_error == "timeout"
        delays.append(round((row.next_attempt_at - before).total_seconds()))
    assert delays == [30, 60, 100, 100]  # BACKOFF_BASE_S doubling, capped
    settled = outbox.record(session=session, row_id=row_id, answer=Answer(error="timeout"))
    session.commit()
    assert settled is not None and settled.refused is not None and settled.refused.code == "unreachable"
    assert "after 5 attempts" in str(settled.refused)
    assert session.get(OutboxModel, row_id).status is OutboxStatus.failed  # type: ignore[union-attr]


def test_due_lists_pending_calls_whose_time_has_come_oldest_first(session: Session) -> None:
    later, sooner, answered = queued(session, "a"), queued(session, "b"), queued(session, "c")
    now = utcnow()
    session.get(OutboxModel, later).next_attempt_at = now - timedelta(seconds=10)  # type: ignore[union-attr]
    session.get(OutboxModel, sooner).next_attempt_at = now - timedelta(seconds=60)  # type: ignore[union-attr]
    session.commit()
    outbox.record(session=session, row_id=answered, answer=Answer(result={"id": "x"}))
    future = queued(session, "d")
    session.get(OutboxModel, future).next_attempt_at = now + timedelta(hours=1)  # type: ignore[union-attr]
    session.commit()
    assert outbox.due(session=session) == [sooner, later]

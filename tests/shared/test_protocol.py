"""The worker protocol's models: strict on what the agent sends, tolerant on what it reads."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.protocol import (
    Assignment, ClaimReply, HeartbeatReply, LeaseEvents, WorkerHeartbeat, WorkerRegister, is_supported,
)
from tests.fakes import registration


def test_registration_is_strict_about_unknown_fields() -> None:
    WorkerRegister.model_validate(registration("pc"))
    with pytest.raises(ValidationError, match="extra"):
        WorkerRegister.model_validate({**registration("pc"), "gpu_count": 2})


def test_registration_refuses_prices_finer_than_a_micro_dollar() -> None:
    with pytest.raises(ValidationError, match="6 decimal places"):
        WorkerRegister.model_validate(registration("pc", price="0.1234567"))


@pytest.mark.parametrize("bad", [{"activity": "gaming"}, {"activity": "idle", "gpus": [{"uuid": "g", "temperature_c": 900}]},
                                 {"activity": "idle", "step": -1}])
def test_heartbeat_rejects_nonsense(bad: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValidationError):
        WorkerHeartbeat.model_validate(bad)


def test_lease_events_need_at_least_one_and_at_most_500() -> None:
    with pytest.raises(ValidationError):
        LeaseEvents.model_validate({"events": []})
    with pytest.raises(ValidationError):
        LeaseEvents.model_validate({"events": [{"type": "log", "message": "x"}] * 501})


def test_replies_ignore_fields_a_newer_coordinator_adds() -> None:
    reply = HeartbeatReply.model_validate({"commands": [{"type": "migrate", "lease_id": "l", "new": 1}],
                                           "heartbeat_interval_s": 10, "shiny": True})
    assert reply.commands[0].type == "migrate"  # an older agent skips command types it does not know
    assert ClaimReply.model_validate({"assignment": None, "later": "x"}).assignment is None
    assert "shiny" not in Assignment.model_fields


@pytest.mark.parametrize(("header", "ok"), [("1", True), (None, False), ("2", False), ("one", False), ("", False)])
def test_protocol_versions(header: str | None, ok: bool) -> None:
    assert is_supported(header) is ok

"""`worker/reporter.py`: what a lease owes is sent again after each pause while the coordinator is unreachable,
never given up while the agent runs, and kept (`Undelivered`) once it stops; a lost lease or a refusal is not
retried; progress goes in order, in bounded calls, each delivered batch leaving the list."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from shared.jobspec import JobSpec
from shared.protocol import Assignment
from worker.channel import CoordinatorUnreachable, LeaseLost
from worker.reporter import EVENTS_PER_CALL, Reporter, Undelivered


class Flaky:
    """Unreachable for the first `down` calls, then answers; records the batches it was sent."""

    def __init__(self, down: int = 0, error: Exception | None = None) -> None:
        self.down, self.error, self.calls, self.batches = down, error, 0, []  # type: ignore[var-annotated]

    def events(self, lease_id: str, token: int, events: list[dict[str, Any]]) -> str:
        self.calls += 1
        if self.error is not None:
            raise self.error
        if self.calls <= self.down:
            raise CoordinatorUnreachable("down")
        self.batches.append([e["step"] for e in events])
        return "ok"


A = Assignment(lease_id="lease-1", fencing_token=2, job_id="ftjob-1", base_model_repo=None, gpu_uuid=None,
               spec=JobSpec(job_id="ftjob-1", base_model="tunegrid/tiny-llama", model_dir="m"),
               training_file_url="/t", training_file_sha256="0" * 64, ask_price_per_gpu_hour="0.30", lease_ttl_s=30,
               lease_grace_s=120, heartbeat_interval_s=10)


def test_an_outage_is_waited_out_and_the_call_made_again() -> None:
    channel = Flaky(down=3)
    reporter = Reporter(channel, threading.Event(), pause_s=0.001)  # type: ignore[arg-type]
    assert reporter.until_acknowledged(lambda: channel.events("l", 1, [{"step": 1}])) == "ok"
    assert channel.calls == 4


def test_a_stopping_agent_keeps_what_it_could_not_deliver() -> None:
    stop = threading.Event()
    stop.set()
    channel = Flaky(down=10**9)
    with pytest.raises(Undelivered):
        Reporter(channel, stop, pause_s=5).until_acknowledged(lambda: channel.events("l", 1, []))  # type: ignore[arg-type]
    assert channel.calls == 1  # tried once, no pause waited out


@pytest.mark.parametrize("error", [LeaseLost("gone")])
def test_a_lost_lease_is_not_retried(error: Exception) -> None:
    channel = Flaky(error=error)
    with pytest.raises(LeaseLost):
        Reporter(channel, threading.Event(), pause_s=0.001).until_acknowledged(  # type: ignore[arg-type]
            lambda: channel.events("l", 1, []))
    assert channel.calls == 1


def test_progress_goes_in_order_in_bounded_calls_and_leaves_the_list_as_it_is_delivered() -> None:
    channel = Flaky(down=1)
    pending = [{"step": n} for n in range(EVENTS_PER_CALL * 2 + 5)]
    Reporter(channel, threading.Event(), pause_s=0.001).events(A, pending)  # type: ignore[arg-type]
    assert [len(b) for b in channel.batches] == [EVENTS_PER_CALL, EVENTS_PER_CALL, 5] and pending == []
    assert [step for batch in channel.batches for step in batch] == list(range(EVENTS_PER_CALL * 2 + 5))


def test_progress_delivered_before_a_stop_is_not_sent_again() -> None:
    stop = threading.Event()

    class StopsAfterOne(Flaky):
        def events(self, lease_id: str, token: int, events: list[dict[str, Any]]) -> str:
            if self.batches:
                stop.set()
                raise CoordinatorUnreachable("down again")
            return super().events(lease_id, token, events)

    channel = StopsAfterOne()
    pending = [{"step": n} for n in range(EVENTS_PER_CALL + 1)]
    with pytest.raises(Undelivered):
        Reporter(channel, stop, pause_s=0.001).events(A, pending)  # type: ignore[arg-type]
    assert pending == [{"step": EVENTS_PER_CALL}]  # only what is still owed

"""The owner's policy: schedules, the owner's own GPU use with an idle grace, and temperature hysteresis.
GPU readings are made-up `GpuInfo` values (no NVIDIA driver here)."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from pydantic import ValidationError

from worker.nvml import GpuInfo, Machine
from worker.policy import PolicyGate, Window, WorkerPolicy

MONDAY_NOON = datetime(2026, 11, 23, 12, 0)  # a Monday


def machine(*, temp: float = 50, pids: tuple[int, ...] = (), available: bool = True) -> Machine:
    gpu = GpuInfo(uuid="GPU-0", index=0, name="NVIDIA GeForce RTX 4090", memory_total_bytes=24 << 30,
                  compute_capability="8.9", temperature_c=temp, process_pids=pids, available=available)
    return Machine(driver_version="560", cuda_version="12.6", gpus=(gpu,))


@pytest.mark.parametrize(("window", "moment", "inside"), [
    ("mon-fri 09:00-17:00", MONDAY_NOON, True),
    ("sat,sun 09:00-17:00", MONDAY_NOON, False),
    ("mon-fri 22:00-08:00", MONDAY_NOON.replace(hour=23), True),
    ("mon-fri 22:00-08:00", MONDAY_NOON.replace(hour=7), False),  # Monday 07:00 belongs to Sunday night
    ("mon-fri 22:00-08:00", MONDAY_NOON.replace(hour=7) + timedelta(days=1), True),  # Tuesday 07:00: Monday night
    ("daily 00:00-24:00", MONDAY_NOON, True),
    ("fri-mon 10:00-14:00", MONDAY_NOON, True),  # a range that wraps the week
])
def test_schedule_windows(window: str, moment: datetime, inside: bool) -> None:
    assert Window.parse(window).contains(moment) is inside


def test_bad_windows_are_refused_when_the_policy_loads() -> None:
    with pytest.raises(ValidationError, match="not like"):
        WorkerPolicy(schedule=["weekdays 9-5"])
    with pytest.raises(ValidationError, match="unknown day"):
        WorkerPolicy(schedule=["mon-frx 09:00-17:00"])


def test_a_foreign_process_pauses_work_for_the_idle_grace() -> None:
    gate = PolicyGate(WorkerPolicy(idle_grace_s=180))
    assert gate.check(machine(), now=MONDAY_NOON, ours=set()).allowed
    game = gate.check(machine(pids=(4242,)), now=MONDAY_NOON, ours=set())
    assert not game.allowed and "4242" in game.reason
    assert gate.check(machine(pids=(777,)), now=MONDAY_NOON, ours={777}).allowed is False  # still in the grace
    assert not gate.check(machine(), now=MONDAY_NOON + timedelta(seconds=179), ours=set()).allowed
    assert gate.check(machine(), now=MONDAY_NOON + timedelta(seconds=181), ours=set()).allowed


def test_our_own_trainer_is_not_the_owner() -> None:
    gate = PolicyGate(WorkerPolicy())
    assert gate.check(machine(pids=(777,)), now=MONDAY_NOON, ours={777}).allowed


def test_temperature_hysteresis() -> None:
    gate = PolicyGate(WorkerPolicy(temperature_pause_c=83, temperature_resume_c=75))
    readings = [70, 82, 83, 80, 76, 74, 80]
    allowed = [gate.check(machine(temp=t), now=MONDAY_NOON, ours=set()).allowed for t in readings]
    assert allowed == [True, True, False, False, False, True, True]


def test_only_shared_gpus_count_and_unreadable_ones_stop_work() -> None:
    gate = PolicyGate(WorkerPolicy(shared_gpus=["GPU-other"]))
    assert gate.check(machine(pids=(1,)), now=MONDAY_NOON, ours=set()).allowed  # GPU-0 is not shared: CPU-only
    gate = PolicyGate(WorkerPolicy())
    verdict = gate.check(machine(available=False), now=MONDAY_NOON, ours=set())
    assert not verdict.allowed and "unavailable" in verdict.reason


def test_outside_the_schedule_nothing_runs() -> None:
    gate = PolicyGate(WorkerPolicy(schedule=["sat,sun 00:00-24:00"]))
    assert gate.check(machine(), now=MONDAY_NOON, ours=set()).reason == "outside the owner's schedule"

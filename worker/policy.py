"""The PC owner's rules, decided on every reading: may the agent work now?

Share only chosen GPUs; step aside while a foreign process (a game, a render) uses a shared GPU and for
`idle_grace_s` after (as BOINC does); pause above `temperature_pause_c` and resume only below
`temperature_resume_c` (hysteresis, so a card at the threshold does not flap); work only inside the
schedule windows when there are any. The policy lives in `policy.json` in the config dir; flags override it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from decimal import Decimal
from pathlib import Path

from pydantic import Field, field_validator

from shared.protocol import OwnerPolicy
from worker.files import read_json, write_json_atomic
from worker.nvml import GpuInfo, Machine

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(r"^\s*(?P<days>[a-z*,\-]+)\s+(?P<start>\d{1,2}:\d{2})-(?P<end>\d{1,2}:\d{2})\s*$")


def _days(spec: str) -> set[int]:
    if spec in ("*", "daily"):
        return set(range(7))
    chosen: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        if first not in DAYS or (last and last not in DAYS):
            raise ValueError(f"unknown day in {spec!r}; use mon..sun, ranges like mon-fri, or daily")
        a, b = DAYS.index(first), DAYS.index(last or first)
        chosen.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    return chosen


def _clock(text: str) -> time:
    hours, minutes = (int(x) for x in text.split(":"))
    if hours == 24 and minutes == 0:
        return time.max
    return time(hours, minutes)


@dataclass(frozen=True, slots=True)
class Window:
    """'mon-fri 22:00-08:00': from 22:00 on Monday to Friday, until 08:00 the next morning."""

    days: frozenset[int]
    start: time
    end: time

    @classmethod
    def parse(cls, text: str) -> Window:
        match = _WINDOW.match(text.lower())
        if match is None:
            raise ValueError(f"schedule window {text!r} is not like 'mon-fri 22:00-08:00'")
        return cls(frozenset(_days(match["days"])), _clock(match["start"]), _clock(match["end"]))

    def contains(self, moment: datetime) -> bool:
        now = moment.time()
        if self.start <= self.end:
            return moment.weekday() in self.days and self.start <= now < self.end
        # Crosses midnight: the evening part belongs to the day it starts, the morning part to the day before.
        if now >= self.start:
            return moment.weekday() in self.days
        return now < self.end and (moment - timedelta(days=1)).weekday() in self.days


class WorkerPolicy(OwnerPolicy):
    """The owner's policy as the agent keeps it: what the coordinator sees, plus the lowest price to work for."""

    min_price_per_gpu_hour: Decimal = Field(default=Decimal("0"), ge=0, le=1000)

    @field_validator("schedule")
    @classmethod
    def _windows_parse(cls, value: list[str]) -> list[str]:
        for window in value:
            Window.parse(window)
        return value

    def public(self) -> OwnerPolicy:
        return OwnerPolicy.model_validate(self.model_dump(exclude={"min_price_per_gpu_hour"}))


def load_policy(path: Path) -> WorkerPolicy:
    data = read_json(path)
    return WorkerPolicy.model_validate(data) if data is not None else WorkerPolicy()


def save_policy(path: Path, policy: WorkerPolicy) -> None:
    write_json_atomic(path, policy.model_dump(mode="json"))


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    reason: str = ""


class PolicyGate:
    """Decides from each reading; remembers when the owner last used a GPU and whether a card is cooling down."""

    def __init__(self, policy: WorkerPolicy) -> None:
        self.policy = policy
        self._windows = [Window.parse(w) for w in policy.schedule]
        self._last_foreign: datetime | None = None
        self._hot = False

    def shared(self, gpus: tuple[GpuInfo, ...]) -> list[GpuInfo]:
        chosen = self.policy.shared_gpus
        return [g for g in gpus if chosen is None or g.uuid in chosen or str(g.index) in chosen]

    def check(self, machine: Machine, *, now: datetime, ours: set[int]) -> Verdict:
        """`now` is the owner's local time (schedules are in it); `ours`: process ids of our own trainer."""
        if self._windows and not any(w.contains(now) for w in self._windows):
            return Verdict(False, "outside the owner's schedule")
        gpus = self.shared(machine.gpus)
        if not gpus:
            return Verdict(True)  # CPU-only: nothing of the owner's to protect but the schedule
        if any(not g.available for g in gpus):
            return Verdict(False, "GPU unavailable (NVML could not read it)")
        foreign = sorted({pid for g in gpus for pid in g.process_pids} - ours)
        if foreign:
            self._last_foreign = now
            return Verdict(False, f"the owner is using the GPU (process {', '.join(map(str, foreign[:3]))})")
        if self._last_foreign is not None:
            quiet = (now - self._last_foreign).total_seconds()
            if quiet < self.policy.idle_grace_s:
                return Verdict(False, f"the owner used the GPU {int(quiet)} s ago; waiting {self.policy.idle_grace_s} s")
        hottest = max((g.temperature_c for g in gpus if g.temperature_c is not None), default=None)
        if hottest is not None:
            if self._hot and hottest < self.policy.temperature_resume_c:
                self._hot = False
            elif not self._hot and hottest >= self.policy.temperature_pause_c:
                self._hot = True
            if self._hot:
                return Verdict(False, f"GPU at {hottest:.0f} °C; resuming below {self.policy.temperature_resume_c} °C")
        return Verdict(True)

"""Reading the trainer's `out/progress.jsonl` as it grows, and turning its lines into lease events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared.protocol import LeaseEvent
from worker.jobdir import ProgressReader


class ProgressTail:
    """New complete lines of the trainer's `out/progress.jsonl` under `work` (a job folder's trainer side) as JSON
    objects; read without following links, a bounded amount at a time (`worker.jobdir.ProgressReader`)."""

    def __init__(self, work: Path, offset: int = 0) -> None:
        self._reader = ProgressReader(work, offset)

    @property
    def offset(self) -> int:
        return self._reader.offset

    def read(self) -> list[tuple[int, dict[str, Any]]]:
        """Each new line with its place in the file (the offset just past it): the `seq` of its event."""
        lines = []
        for end, raw in self._reader.read():
            try:
                line = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a torn line cannot happen with line-buffered appends; skip it if it ever does
            if isinstance(line, dict):
                lines.append((end, line))
        return lines


def lease_event(line: dict[str, Any], seq: int | None = None) -> dict[str, Any] | None:
    """The protocol's `LeaseEvent` for a trainer line; None for lines the coordinator need not see, and for lines
    whose fields are not what the protocol takes (the job's folder is not trusted: one bad line must not
    block the events around it). `seq`, the line's place in the file, lets the coordinator drop an event a
    restarted agent sends again (it cannot know whether its last call was recorded before it died)."""
    event = _event(line)
    if event is None:
        return None
    event = {k: v for k, v in {**event, "seq": seq}.items() if v is not None}
    try:
        LeaseEvent.model_validate(event)
    except ValidationError:
        return None
    return event


STARTED = {"verify": "Verification", "export": "Export", "batch": "Batch"}
PREFERENCE_FIELDS = ("chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy")


def _preference(line: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    """DPO's figures of a step (or, prefixed `valid_`, an evaluation), when the line has them all."""
    values = {name: line.get(prefix + name) for name in PREFERENCE_FIELDS}
    return values if all(v is not None for v in values.values()) else None


def _event(line: dict[str, Any]) -> dict[str, Any] | None:
    kind, when = line.get("type"), line.get("time")
    if kind == "started":
        return {"type": "started", "time": when, "total_steps": line.get("total_steps"),
                "step": line.get("resumed_from_step"),
                "message": f"{STARTED.get(line.get('kind'), 'Training')} started on "
                           f"{line.get('device', 'the device')}"
                           + (f", resuming from step {line['resumed_from_step']}" if line.get("resumed_from_step") else "")}
    if kind == "step":
        return {"type": "progress", "time": when, "step": line.get("step"), "epoch": line.get("epoch"),
                "train_loss": line.get("loss"), "tokens_per_s": line.get("tokens_per_s"),
                "trained_tokens": line.get("tokens"), "total_steps": line.get("total_steps"),
                "eta_s": line.get("eta_s"), "preference": _preference(line, "")}
    if kind == "eval":
        return {"type": "eval", "time": when, "step": line.get("step"), "eval_loss": line.get("valid_loss"),
                "preference": _preference(line, "valid_")}
    if kind == "early_stopping":
        return {"type": "log", "time": when,
                "message": f"Early stopping: {line.get('reason', '')}; keeping step {line.get('best_step')}"[:2000]}
    if kind == "checkpoint":
        return {"type": "checkpoint", "time": when, "step": line.get("step"), "message": f"checkpoint at step {line.get('step')}"}
    if kind == "exported":
        return {"type": "log", "time": when, "message": f"Exported {line.get('format')}: {line.get('bytes')} bytes in "
                                                         f"{line.get('seconds')} s"[:2000]}
    if kind in ("warning", "error"):
        return {"type": "log", "time": when, "message": f"{kind}: {line.get('message', '')}"[:2000]}
    return None

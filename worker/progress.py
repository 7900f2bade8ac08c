"""Reading the trainer's `out/progress.jsonl` as it grows, and turning its lines into lease events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ProgressTail:
    """New complete lines of a file that another process appends to (a partial last line waits for its end)."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = path
        self._offset = offset

    @property
    def offset(self) -> int:
        return self._offset

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self._offset += end
        lines = []
        for raw in data[:end].splitlines():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                continue  # a torn line cannot happen with line-buffered appends; skip it if it ever does
        return lines


def lease_event(line: dict[str, Any]) -> dict[str, Any] | None:
    """The protocol's `LeaseEvent` for a trainer line; None for lines the coordinator need not see."""
    kind, when = line.get("type"), line.get("time")
    if kind == "started":
        return {"type": "started", "time": when, "total_steps": line.get("total_steps"),
                "step": line.get("resumed_from_step"),
                "message": f"Training started on {line.get('device', 'the device')}"
                           + (f", resuming from step {line['resumed_from_step']}" if line.get("resumed_from_step") else "")}
    if kind == "step":
        return {"type": "progress", "time": when, "step": line.get("step"), "epoch": line.get("epoch"),
                "train_loss": line.get("loss"), "tokens_per_s": line.get("tokens_per_s"),
                "trained_tokens": line.get("tokens"), "total_steps": line.get("total_steps")}
    if kind == "eval":
        return {"type": "eval", "time": when, "step": line.get("step"), "eval_loss": line.get("valid_loss")}
    if kind == "checkpoint":
        return {"type": "checkpoint", "time": when, "step": line.get("step"), "message": f"checkpoint at step {line.get('step')}"}
    if kind in ("warning", "error"):
        return {"type": "log", "time": when, "message": f"{kind}: {line.get('message', '')}"[:2000]}
    return None

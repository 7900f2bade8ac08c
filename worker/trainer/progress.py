"""`out/progress.jsonl`: the trainer's one channel to the agent, a JSON object per line, flushed as written."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class Progress:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def emit(self, event: str, /, **fields: Any) -> None:
        self._file.write(json.dumps({"type": event, "time": round(time.time(), 3), **fields}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

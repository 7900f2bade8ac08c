"""`worker/progress.py`: the trainer's `out/progress.jsonl`, read as it grows (whole lines only, from an offset),
and each line turned into the protocol's lease event, or dropped when the coordinator need not see it or its
fields are not what the protocol takes (the job folder is a stranger's: one bad line must not block the rest)."""

from __future__ import annotations

import json
from pathlib import Path

from worker.progress import ProgressTail, lease_event


def test_lines_become_lease_events() -> None:
    assert lease_event({"type": "step", "step": 3, "loss": 1.5, "tokens_per_s": 900.0, "total_steps": 10}) == {
        "type": "progress", "step": 3, "train_loss": 1.5, "tokens_per_s": 900.0, "total_steps": 10}
    assert lease_event({"type": "eval", "step": 3, "valid_loss": 1.7}) == {"type": "eval", "step": 3, "eval_loss": 1.7}
    assert lease_event({"type": "eval", "step": 3, "valid_loss": 1.7, "seq": 1}, 420) == {
        "type": "eval", "step": 3, "eval_loss": 1.7, "seq": 420}  # the place in the file, never the line's own say
    started = lease_event({"type": "started", "total_steps": 10, "resumed_from_step": 4, "device": "cpu"})
    assert started is not None and started["step"] == 4 and "resuming from step 4" in started["message"]
    assert lease_event({"type": "error", "message": "x" * 5000})["message"].startswith("error: x")  # type: ignore[index]
    assert len(lease_event({"type": "error", "message": "x" * 5000})["message"]) == 2000  # type: ignore[index]


def test_lines_the_protocol_would_refuse_are_dropped() -> None:
    for line in ({"type": "finished"}, {"type": "step", "step": -1}, {"type": "step", "step": 2**40},
                 {"type": "step", "step": "three"}, {"type": "eval", "valid_loss": "nan?"}, {"type": "mystery"}):
        assert lease_event(line) is None, line


def test_the_tail_reads_whole_lines_from_where_it_left_off(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    progress = out / "progress.jsonl"
    progress.write_text(json.dumps({"type": "step", "step": 1}) + "\nnot json\n" + '{"type": "st')
    tail = ProgressTail(tmp_path)
    first = len(json.dumps({"type": "step", "step": 1})) + 1
    assert tail.read() == [(first, {"type": "step", "step": 1})]  # the torn last line waits for its end
    with progress.open("a") as f:
        f.write('ep", "step": 2}\n')
    assert tail.read() == [(progress.stat().st_size, {"type": "step", "step": 2})]  # seq: its place in the file
    again = ProgressTail(tmp_path, tail.offset)
    assert again.read() == []  # a restarted reader does not read it twice

"""The batch program on the tiny Llama: every remaining request answered once, in parts the coordinator accepts,
with the sampling each asked for (a seed gives the same answer twice, `max_tokens` bounds the answer, a stop
string ends it), a prompt too long for the model reported as such, and a stop mid-batch writing what it has."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from coordinator.services.batch_leases import _parse  # noqa: PLC2701 - the coordinator's reading of a part
from coordinator.storage import DiskStore
from shared.jobspec import JobSpec
from tests.fakes import batch_lines
from tests.trainer.conftest import progress_lines
from worker.trainer import generate
from worker.trainer.__main__ import run
from worker.trainer.errors import EXIT_DONE
from worker.trainer.progress import Progress


def batch_job(job_dir: Path, model_dir: Path, lines: bytes, done: list[str] = ()) -> Path:  # type: ignore[assignment]
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "train.jsonl").write_bytes(lines)
    (job_dir / "batch_done.jsonl").write_text("".join(json.dumps({"custom_id": c}) + "\n" for c in done))
    spec = JobSpec(job_id="batch_test", kind="batch", base_model="tunegrid/tiny-llama", model_dir=str(model_dir),
                   max_seq_len=512)
    (job_dir / "spec.json").write_text(spec.model_dump_json())
    return job_dir


def answers(job_dir: Path) -> list[dict]:  # type: ignore[type-arg]
    parts = sorted((job_dir / "out" / "batch").glob("part-*.jsonl"), key=lambda p: int(p.stem.split("-")[1]))
    return [json.loads(line) for p in parts for line in p.read_text().splitlines()]


def line(custom_id: str, content: str, **body: object) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "tunegrid/tiny-llama", "messages": [{"role": "user", "content": content}], **body}}).encode() + b"\n"


def test_every_remaining_request_is_answered_once_in_parts_the_coordinator_accepts(tiny_model_dir: Path,
                                                                                   tmp_path: Path) -> None:
    job = batch_job(tmp_path / "job", tiny_model_dir, batch_lines(12, temperature=0.7), done=["req-3", "req-7"])
    assert run(job) == EXIT_DONE
    got = answers(job)
    assert sorted(a["custom_id"] for a in got) == sorted(f"req-{i}" for i in range(12) if i not in (3, 7))
    assert all(a["prompt_tokens"] > 0 and 0 <= a["completion_tokens"] <= 16 for a in got)
    announced = [p for p in progress_lines(job) if p["type"] == "batch_part"]
    assert announced and announced[-1]["answered"] == 10
    store = DiskStore(tmp_path / "store")
    for part in sorted((job / "out" / "batch").glob("part-*.jsonl")):  # each part as the coordinator reads it
        blob = store.put(f"batches/lease-x/{part.stem}", part.open("rb"))
        assert len(_parse(store, blob)) > 0
    assert json.loads((job / "out" / "batch.json").read_text()) == {"answered": 10, "parts": len(announced)}


def test_each_request_samples_as_it_asked(tiny_model_dir: Path, tmp_path: Path) -> None:
    lines = (line("seeded-a", "hello there", seed=11, temperature=1.0, max_tokens=12)
             + line("seeded-b", "hello there", seed=11, temperature=1.0, max_tokens=12)
             + line("greedy-a", "what is two plus two", temperature=0, max_tokens=12)
             + line("greedy-b", "what is two plus two", temperature=0, max_tokens=12)
             + line("short", "count to ten", temperature=1.0, max_tokens=2)
             + line("long", "word " * 300, max_tokens=64))
    job = batch_job(tmp_path / "job", tiny_model_dir, lines)
    assert run(job) == EXIT_DONE
    got = {a["custom_id"]: a for a in answers(job)}
    assert got["seeded-a"]["content"] == got["seeded-b"]["content"]  # the same seed, the same answer
    assert got["greedy-a"]["content"] == got["greedy-b"]["content"]
    assert got["short"]["completion_tokens"] <= 2
    assert got["short"]["finish_reason"] in ("stop", "length")
    assert got["long"]["error"]["code"] == "context_length_exceeded"


def test_a_stop_string_ends_the_answer(tiny_model_dir: Path, tmp_path: Path) -> None:
    free = batch_job(tmp_path / "free", tiny_model_dir, line("x", "the answer is", temperature=0, max_tokens=24))
    assert run(free) == EXIT_DONE
    text = answers(free)[0]["content"]
    if len(text) < 3:
        pytest.skip("the random model ended its answer at once")  # nothing to stop in
    stop = text[1:3]
    cut = batch_job(tmp_path / "cut", tiny_model_dir, line("x", "the answer is", temperature=0, max_tokens=24,
                                                           stop=[stop]))
    assert run(cut) == EXIT_DONE
    answer = answers(cut)[0]
    assert stop not in answer["content"] and text.startswith(answer["content"]) and answer["finish_reason"] == "stop"


class StopAfter(threading.Event):
    """Set once the program has looked `n` times (a SIGTERM arriving mid-batch)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.left = n

    def is_set(self) -> bool:
        self.left -= 1
        return self.left < 0


def test_a_stop_mid_batch_writes_the_answers_so_far(tiny_model_dir: Path, tmp_path: Path) -> None:
    job = batch_job(tmp_path / "job", tiny_model_dir, batch_lines(6, seed=1))  # seeded: one request a group
    spec = JobSpec.model_validate_json((job / "spec.json").read_text())
    result = generate.run(spec, job, Progress(job / "out" / "progress.jsonl"), stop=StopAfter(2))
    assert result == {"preempted": True}
    assert [a["custom_id"] for a in answers(job)] == ["req-0", "req-1"]


def test_generation_groups_stay_within_the_tokens_placement_sized_for(tiny_model_dir: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each `generate` call holds at most GENERATION_TOKENS tokens (rows padded to the longest prompt, plus
    max_tokens): the KV cache placement counted (shared/memory.py estimate_generation). Budget made small here."""
    from transformers import GenerationMixin  # noqa: PLC0415

    from worker.trainer import generate  # noqa: PLC0415

    monkeypatch.setattr(generate, "GENERATION_TOKENS", 120)
    shapes: list[tuple[int, int]] = []
    original = GenerationMixin.generate

    def recording(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        shapes.append((kwargs["input_ids"].shape[0], kwargs["input_ids"].shape[1] + kwargs["max_new_tokens"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", recording)
    job = batch_job(tmp_path / "job", tiny_model_dir, batch_lines(12, temperature=0.0))
    assert run(job) == EXIT_DONE
    assert sorted(a["custom_id"] for a in answers(job)) == sorted(f"req-{i}" for i in range(12))
    assert len(shapes) > 2 and all(rows * tokens <= 120 for rows, tokens in shapes), shapes

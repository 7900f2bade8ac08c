"""Bad input ends in a final `error` line and the documented exit code, never a bare traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.trainer.conftest import arithmetic_chat, progress_lines, write_job
from worker.trainer.__main__ import run
from worker.trainer.errors import EXIT_USER_ERROR, EXIT_WORKER_ERROR


def _last_error(job: Path) -> dict:
    last = progress_lines(job)[-1]
    assert last["type"] == "error", last
    return last


def test_missing_spec(tmp_path: Path) -> None:
    assert run(tmp_path) == EXIT_USER_ERROR
    assert "spec.json is missing" in _last_error(tmp_path)["message"]


def test_invalid_spec(tmp_path: Path) -> None:
    (tmp_path / "spec.json").write_text(json.dumps({"job_id": "x", "base_model": "m", "model_dir": "/m",
                                                    "quantization": "int3"}))
    assert run(tmp_path) == EXIT_USER_ERROR
    assert _last_error(tmp_path)["kind"] == "user_error"


def test_unknown_model_directory(tmp_path: Path) -> None:
    job = write_job(tmp_path, tmp_path / "no-such-model", train=arithmetic_chat(20))
    assert run(job) == EXIT_USER_ERROR
    assert "no model at" in _last_error(job)["message"]


@pytest.mark.parametrize("bad_line,reason", [("{oops", "Line 3 is not valid JSON"),
                                              ('{"messages": [{"role": "user", "content": "hi"}]}', "Line 3 ")])
def test_corrupt_line(tiny_model_dir: Path, tmp_path: Path, bad_line: str, reason: str) -> None:
    job = write_job(tmp_path, tiny_model_dir, train=arithmetic_chat(20))
    lines = (job / "train.jsonl").read_text().splitlines()
    lines[2] = bad_line
    (job / "train.jsonl").write_text("\n".join(lines) + "\n")
    assert run(job) == EXIT_USER_ERROR
    error = _last_error(job)
    assert error["kind"] == "user_error" and reason in error["message"]


def test_nothing_left_to_train_after_truncation(tiny_model_dir: Path, tmp_path: Path) -> None:
    long_prompt = [{"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}]
    job = write_job(tmp_path, tiny_model_dir, train=long_prompt * 3, max_seq_len=32, validation_fraction=0)
    assert run(job) == EXIT_USER_ERROR
    lines = progress_lines(job)
    assert any(line["type"] == "warning" and "truncated" in line["message"] for line in lines)
    assert "no example has any token to train on" in lines[-1]["message"]


def test_gpu_out_of_memory_is_a_worker_error_with_a_hint_simulated(tiny_model_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: the trainer's run is replaced by one raising what torch.cuda raises when memory runs out.
    from worker.trainer import train

    def out_of_memory(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train.Trainer, "run", out_of_memory)
    job = write_job(tmp_path, tiny_model_dir, train=arithmetic_chat(20))
    assert run(job) == EXIT_WORKER_ERROR
    error = _last_error(job)
    assert error["kind"] == "worker_error" and "lower batch_size" in error["message"]
    assert "Tried to allocate" not in error["message"]  # PyTorch's words (other processes, sizes) stay there


@pytest.mark.parametrize(("batch_size", "hint"), [
    (4, "lower batch_size to 2 (each step then learns from fewer examples), or ask for a worker with more memory"),
    (1, "even at batch_size 1; ask for a worker with more memory"),
])
def test_out_of_memory_in_a_step_names_the_micro_batch_and_what_to_ask_simulated(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_size: int, hint: str) -> None:
    # No GPU here: the step raises what PyTorch's CUDA allocator raises (bench/gpu.sh forces the real one).
    import torch  # noqa: PLC0415

    from worker.trainer import train  # noqa: PLC0415

    def out_of_memory(self, model, chunk):  # type: ignore[no-untyped-def]
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train.Supervised, "step", out_of_memory)
    job = write_job(tmp_path, tiny_model_dir, train=arithmetic_chat(20), hyperparameters={"batch_size": batch_size})
    assert run(job) == EXIT_WORKER_ERROR
    error = _last_error(job)
    assert error["kind"] == "worker_error"
    assert "ran out at step 1" in error["message"] and f"{batch_size} rows of up to 256 tokens" in \
        error["message"] and hint in error["message"], error["message"]


def test_unknown_base_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path, tiny_model_dir, train=arithmetic_chat(20))
    spec = json.loads((job / "spec.json").read_text())
    (job / "spec.json").write_text(json.dumps({**spec, "base_model": "gpt-9"}))
    assert run(job) == EXIT_USER_ERROR
    assert "unknown base model" in _last_error(job)["message"]


@pytest.mark.parametrize(("raised", "hinted"), [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"), True),
    (MemoryError(), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
])
def test_only_running_out_of_memory_gets_the_hint(tiny_model_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, raised: BaseException,
                                                  hinted: bool) -> None:
    from worker.trainer import train  # noqa: PLC0415

    def failing(self, model, chunk):  # type: ignore[no-untyped-def]
        raise raised

    monkeypatch.setattr(train.Supervised, "step", failing)
    job = write_job(tmp_path, tiny_model_dir, train=arithmetic_chat(20), hyperparameters={"batch_size": 2})
    assert run(job) == EXIT_WORKER_ERROR
    message = _last_error(job)["message"]
    assert ("lower batch_size to 1" in message) is hinted, message
    assert ("shapes cannot be multiplied" in message) is not hinted

"""Checkpoints resume exactly, and SIGTERM ends a run with a checkpoint and exit code 5 within a bounded time."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.checkpoint import MEMBERS
from tests.trainer.conftest import arithmetic_chat, progress_lines, write_job
from worker.trainer.__main__ import run
from worker.trainer.errors import EXIT_BAD_CHECKPOINT, EXIT_DONE, EXIT_PREEMPTED

SPEC = {"hyperparameters": {"n_epochs": 2, "batch_size": 1, "learning_rate": 3e-3},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1}, "checkpoint_every_steps": 4, "eval_every_steps": 100}


def _adapter(job: Path) -> dict[str, torch.Tensor]:
    return load_file(job / "out" / "adapter" / "adapter_model.safetensors")


def test_resuming_from_step_k_gives_the_uninterrupted_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    train = arithmetic_chat(64)
    straight = write_job(tmp_path / "straight", tiny_model_dir, train=train, **SPEC)
    assert run(straight) == EXIT_DONE
    total = json.loads((straight / "out" / "result.json").read_text())["steps"]
    k = 4
    assert total >= 2 * k

    resumed = write_job(tmp_path / "resumed", tiny_model_dir, train=train, **SPEC)
    shutil.copytree(straight / "out" / "checkpoints" / f"step-{k}", resumed / "resume")
    assert run(resumed) == EXIT_DONE
    assert progress_lines(resumed)[0]["resumed_from_step"] == k
    want, got = _adapter(straight), _adapter(resumed)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name  # bit for bit
    result = json.loads((resumed / "out" / "result.json").read_text())
    assert result["trained_tokens"] == json.loads((straight / "out" / "result.json").read_text())["trained_tokens"]


def test_sigterm_checkpoints_and_exits_5_then_resumes(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = {**SPEC, "hyperparameters": {"n_epochs": 40, "batch_size": 4, "learning_rate": 1e-3},
            "checkpoint_every_steps": 10_000}
    job = write_job(tmp_path / "job", tiny_model_dir, train=arithmetic_chat(64), **spec)
    process = subprocess.Popen([sys.executable, "-m", "worker.trainer", "--job", str(job)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = job / "out" / "progress.jsonl"
    deadline = time.monotonic() + 120
    while not (progress.exists() and '"type": "step"' in progress.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, "trainer did not start stepping"
        time.sleep(0.1)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == EXIT_PREEMPTED
    stopped_in = time.monotonic() - sent
    lines = progress_lines(job)
    assert lines[-1]["type"] == "preempted" and lines[-2]["type"] == "checkpoint"
    step = lines[-1]["step"]
    assert stopped_in < 30, stopped_in  # the agent's budget to free the GPU
    assert lines[-2]["step"] == step and "path" not in lines[-2]  # the agent derives the folder from the step
    checkpoint = job / "out" / "checkpoints" / f"step-{step}"
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted(MEMBERS)  # tensors and JSON, no pickle

    shutil.copytree(checkpoint, job / "resume")
    # Resuming continues from that step (run only a moment: stop it again, it must checkpoint again).
    again = subprocess.Popen([sys.executable, "-m", "worker.trainer", "--job", str(job)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while sum(1 for line in progress_lines(job) if line["type"] == "started") < 2 or \
            progress_lines(job)[-1]["type"] != "step":
        assert again.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=60) == EXIT_PREEMPTED
    restarted = [line for line in progress_lines(job) if line["type"] == "started"][-1]
    assert restarted["resumed_from_step"] == step


@pytest.fixture(scope="module")
def step_4(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An honest checkpoint at step 4 of a short job."""
    job = write_job(tmp_path_factory.mktemp("honest"), tiny_model_dir, train=arithmetic_chat(32), **SPEC)
    assert run(job) == EXIT_DONE
    return job / "out" / "checkpoints" / "step-4"


def _zero_rng(resume: Path) -> None:
    save_file({"torch": torch.zeros(5056, dtype=torch.uint8)}, str(resume / "rng.safetensors"))


def _poison_optimizer(resume: Path, *, nan: bool) -> None:
    moments = load_file(resume / "optimizer.safetensors")
    for key in moments:
        if key.startswith("exp_avg/") and nan:
            moments[key] = torch.full_like(moments[key], float("nan"))
        elif key.startswith("step/") and not nan:
            moments[key] = torch.tensor(-1.0)
    save_file(moments, str(resume / "optimizer.safetensors"))


@pytest.mark.parametrize("poison,reason", [
    (_zero_rng, "cannot be loaded"),  # torch refuses the generator state
    (lambda r: _poison_optimizer(r, nan=True), "not finite"),
    (lambda r: _poison_optimizer(r, nan=False), "step counts"),
])
def test_a_checkpoint_only_the_trainer_can_see_is_bad_is_the_checkpoints_fault_not_the_workers(
    tiny_model_dir: Path, tmp_path: Path, step_4: Path, poison, reason: str,  # type: ignore[no-untyped-def]
) -> None:
    """Values that pass every structural check but that torch refuses or that would poison training end the run
    as a bad checkpoint (exit 6), which the coordinator never counts against the worker that opened it."""
    second = write_job(tmp_path / "second", tiny_model_dir, train=arithmetic_chat(32), **SPEC)
    shutil.copytree(step_4, second / "resume")
    poison(second / "resume")
    assert run(second) == EXIT_BAD_CHECKPOINT
    last = progress_lines(second)[-1]
    assert last["kind"] == "bad_checkpoint" and reason in last["message"], last

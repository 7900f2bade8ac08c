"""Continued training: a job starts from the adapter of an earlier fine-tune (or checkpoint) placed in `initial/`;
DPO from a supervised adapter takes that adapter as its reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.trainer.conftest import arithmetic_chat, arithmetic_preferences, progress_lines, write_job
from worker.trainer.__main__ import run
from worker.trainer.errors import EXIT_DONE, EXIT_USER_ERROR

HP = {"n_epochs": 3, "batch_size": 4, "learning_rate": 3e-3}


def _losses(job: Path) -> list[float]:
    return [line["loss"] for line in progress_lines(job) if line["type"] == "step"]


def _continue(job: Path, adapter_from: Path) -> None:
    (job / "initial").mkdir(parents=True)
    shutil.copy(adapter_from / "out" / "adapter" / "adapter_model.safetensors", job / "initial")


def test_continued_training_resumes_from_the_named_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = write_job(tmp_path / "first", tiny_model_dir, train=arithmetic_chat(64),
                      hyperparameters={**HP, "n_epochs": 6, "batch_size": 1}, lora={"r": 8, "alpha": 16})
    assert run(first) == EXIT_DONE
    fresh = write_job(tmp_path / "fresh", tiny_model_dir, train=arithmetic_chat(64, seed=5),
                      hyperparameters={**HP, "n_epochs": 1}, lora={"r": 8, "alpha": 16})
    assert run(fresh) == EXIT_DONE
    second = tmp_path / "second"
    _continue(second, first)
    write_job(second, tiny_model_dir, train=arithmetic_chat(64, seed=5), hyperparameters={**HP, "n_epochs": 1},
              lora={"r": 8, "alpha": 16}, initial_adapter=True)
    assert run(second) == EXIT_DONE
    # The continued job starts where the first ended (on new examples of the same task); a fresh one from scratch.
    start, end = _losses(first)[0], sum(_losses(first)[-3:]) / 3
    assert _losses(second)[0] < start - 0.7 * (start - end), (start, end, _losses(second)[:3], _losses(fresh)[:3])
    assert _losses(fresh)[0] > start - 0.3 * (start - end)


def test_dpo_from_a_supervised_adapter_takes_it_as_the_reference(tiny_model_dir: Path, tmp_path: Path) -> None:
    sft = write_job(tmp_path / "sft", tiny_model_dir, train=arithmetic_chat(32), hyperparameters={**HP, "n_epochs": 1},
                    lora={"r": 8, "alpha": 16})
    assert run(sft) == EXIT_DONE
    job = tmp_path / "dpo"
    _continue(job, sft)
    write_job(job, tiny_model_dir, train=arithmetic_preferences(32), validation=arithmetic_preferences(8, seed=7),
              method="dpo", hyperparameters={"n_epochs": 1, "batch_size": 4, "learning_rate": 2e-3},
              lora={"r": 8, "alpha": 16}, initial_adapter=True, eval_every_steps=1)
    assert run(job) == EXIT_DONE
    first_step = next(line for line in progress_lines(job) if line["type"] == "step")
    # Had the reference been the bare base, the SFT adapter's own preference would show as a reward at step 1;
    # against itself (with LoRA dropout the only difference) it starts near zero.
    assert abs(first_step["reward_margin"]) < 0.2, first_step
    assert json.loads((job / "out" / "result.json").read_text())["valid_reward_accuracy"] >= 0.5


def test_a_missing_or_mismatched_initial_adapter_is_a_user_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path / "missing", tiny_model_dir, train=arithmetic_chat(12), initial_adapter=True)
    assert run(job) == EXIT_USER_ERROR and "missing" in progress_lines(job)[-1]["message"]
    small = write_job(tmp_path / "small", tiny_model_dir, train=arithmetic_chat(12), hyperparameters={"n_epochs": 1},
                      lora={"r": 4, "alpha": 8})
    assert run(small) == EXIT_DONE
    other = tmp_path / "other"
    _continue(other, small)
    write_job(other, tiny_model_dir, train=arithmetic_chat(12), lora={"r": 8, "alpha": 16}, initial_adapter=True)
    assert run(other) == EXIT_USER_ERROR and "does not fit this job" in progress_lines(other)[-1]["message"]

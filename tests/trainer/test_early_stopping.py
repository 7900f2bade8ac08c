"""Early stopping: when validation loss turns, training stops and returns the best evaluation's adapter, also
after a resume from a checkpoint taken past the best."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.checkpoint import BEST, MEMBERS, CheckpointRules, check_folder
from shared.jobspec import JobSpec
from tests.trainer.conftest import progress_lines, write_job
from worker.trainer.__main__ import run
from worker.trainer.errors import EXIT_DONE, EXIT_USER_ERROR
from worker.trainer.model import load_adapter, load_tokenizer
from worker.trainer.progress import Progress
from worker.trainer.train import Trainer

SPEC = {"hyperparameters": {"n_epochs": 12, "batch_size": 2, "learning_rate": 5e-3},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "checkpoint_every_steps": 2, "eval_every_steps": 2,
        "early_stopping_patience": 2, "packing": False}


def _answers(answer: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": f"Is {rng.randint(0, 99)} a number?"},
                          {"role": "assistant", "content": answer}]} for _ in range(n)]


def _job(path: Path, model_dir: Path) -> Path:
    # Validation asks the same questions but wants the other answer: its loss falls while the shared end tokens
    # are learned, then rises as "yes" wins. The turn is where early stopping must stop.
    return write_job(path, model_dir, train=_answers("yes", 16, 1), validation=_answers("no", 8, 2), **SPEC)


def _valid_loss(job: Path, model_dir: Path) -> float:
    spec = JobSpec.model_validate_json((job / "spec.json").read_text())
    trainer = Trainer(spec, job, Progress(job / "check.jsonl"))
    objective = trainer.objective(load_tokenizer(model_dir))
    return objective.evaluate(load_adapter(model_dir, job / "out" / "adapter"))["valid_loss"]  # type: ignore[index]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """One run of the job that stops early, shared (each test copies it before changing anything)."""
    job = _job(tmp_path_factory.mktemp("stopped") / "job", tiny_model_dir)
    assert run(job) == EXIT_DONE
    return job


def _copy(stopped: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(stopped, tmp_path / "straight"))


def test_early_stopping_keeps_the_best_step(tiny_model_dir: Path, stopped: Path, tmp_path: Path) -> None:
    job = _copy(stopped, tmp_path)
    lines = progress_lines(job)
    evals = {line["step"]: line["valid_loss"] for line in lines if line["type"] == "eval"}
    result = json.loads((job / "out" / "result.json").read_text())
    best = min(evals, key=evals.get)  # type: ignore[arg-type]
    steps = [line["step"] for line in lines if line["type"] == "step"]
    total = next(line for line in lines if line["type"] == "started")["total_steps"]
    assert result["stopped_early"] and steps[-1] < total, (evals, total)
    assert result["best_step"] == best and steps[-1] == best + 2 * SPEC["early_stopping_patience"]
    assert str(best) in result["early_stopping_reason"]
    # The adapter returned is the best step's: its validation loss is the best one, not the last one's.
    assert result["valid_loss"] == pytest.approx(evals[best], abs=1e-5)
    assert _valid_loss(job, tiny_model_dir) == pytest.approx(evals[best], rel=1e-3)
    assert evals[steps[-1]] > evals[best]
    # Checkpoints past the best carry its weights; the coordinator's check accepts them.
    spec = JobSpec.model_validate_json((job / "spec.json").read_text())
    past = job / "out" / "checkpoints" / f"step-{best + 2}"
    assert sorted(p.name for p in past.iterdir()) == sorted([*MEMBERS, BEST])
    assert check_folder(past, CheckpointRules.for_spec(spec, max_step=total, gpu=False)).early_stopping.best_step == best  # type: ignore[union-attr]
    at_best = job / "out" / "checkpoints" / f"step-{best}"
    assert sorted(p.name for p in at_best.iterdir()) == sorted(MEMBERS)


def test_a_resume_past_the_best_still_returns_the_best(tiny_model_dir: Path, stopped: Path, tmp_path: Path) -> None:
    straight = _copy(stopped, tmp_path)
    best = json.loads((straight / "out" / "result.json").read_text())["best_step"]
    resumed = _job(tmp_path / "resumed", tiny_model_dir)
    shutil.copytree(straight / "out" / "checkpoints" / f"step-{best + 2}", resumed / "resume")
    assert run(resumed) == EXIT_DONE
    result = json.loads((resumed / "out" / "result.json").read_text())
    assert result["best_step"] == best and result["stopped_early"]
    want = load_file(straight / "out" / "adapter" / "adapter_model.safetensors")
    got = load_file(resumed / "out" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_checkpoint_whose_best_weights_are_missing_or_unasked_is_refused(stopped: Path, tmp_path: Path) -> None:
    from shared.checkpoint import CheckpointRejected  # noqa: PLC0415

    job = _copy(stopped, tmp_path)
    best = json.loads((job / "out" / "result.json").read_text())["best_step"]
    spec = JobSpec.model_validate_json((job / "spec.json").read_text())
    rules = CheckpointRules.for_spec(spec, max_step=1000, gpu=False)
    past, at_best = (job / "out" / "checkpoints" / f"step-{s}" for s in (best + 2, best))
    (past / BEST).unlink()
    with pytest.raises(CheckpointRejected, match="is missing"):
        check_folder(past, rules)
    shutil.copy(job / "out" / "adapter" / "adapter_model.safetensors", at_best / BEST)
    with pytest.raises(CheckpointRejected, match="names no earlier best step"):
        check_folder(at_best, rules)


def test_early_stopping_without_validation_data_is_a_user_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path / "job", tiny_model_dir, train=_answers("yes", 12, 1), validation_fraction=0.0,
                    early_stopping_patience=2)
    assert run(job) == EXIT_USER_ERROR and "early stopping needs validation" in progress_lines(job)[-1]["message"]


def test_a_checkpoints_claimed_best_loss_is_measured_again_not_trusted(tiny_model_dir: Path, stopped: Path,
                                                                       tmp_path: Path) -> None:
    """A hostile worker's checkpoint claims its best weights scored 0.0 (no honest evaluation can beat it, so they
    would be returned whatever came after): the resuming trainer measures them again and goes by that."""
    straight = _copy(stopped, tmp_path)
    evals = {line["step"]: line["valid_loss"] for line in progress_lines(straight) if line["type"] == "eval"}
    best = json.loads((straight / "out" / "result.json").read_text())["best_step"]
    resumed = _job(tmp_path / "resumed", tiny_model_dir)
    shutil.copytree(straight / "out" / "checkpoints" / f"step-{best + 2}", resumed / "resume")
    state = json.loads((resumed / "resume" / "state.json").read_text())
    state["early_stopping"]["best_valid_loss"] = 0.0
    (resumed / "resume" / "state.json").write_text(json.dumps(state))
    assert run(resumed) == EXIT_DONE
    stopping = next(line for line in progress_lines(resumed) if line["type"] == "early_stopping")
    assert stopping["best_valid_loss"] == pytest.approx(evals[best], rel=1e-3) and stopping["best_valid_loss"] > 0.1

"""DPO on the tiny model: the loss is the paper's, the reference is the starting adapter, and training raises the
reward margin and accuracy on held-out preference pairs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from shared.jobspec import JobSpec
from tests.trainer.conftest import arithmetic_preferences, progress_lines, write_job
from worker.trainer import dpo
from worker.trainer.__main__ import run
from worker.trainer.errors import EXIT_DONE, EXIT_USER_ERROR
from worker.trainer.model import load_for_training, load_tokenizer
from worker.trainer.progress import Progress
from worker.trainer.train import Trainer


def _starting_figures(job: Path, model_dir: Path) -> dict[str, float]:
    """The held-out figures of the model the job starts from, computed outside the training run."""
    spec = JobSpec.model_validate_json((job / "spec.json").read_text())
    trainer = Trainer(spec, job, Progress(job / "start.jsonl"))
    objective = trainer.objective(load_tokenizer(model_dir))
    model = load_for_training(spec)
    objective.prepare(model, adapter_is_reference=False)
    return objective.evaluate(model)  # type: ignore[return-value]


def test_the_loss_is_minus_log_sigmoid_of_the_scaled_reward_margin() -> None:
    class Fixed(torch.nn.Module):  # a "model" whose sequence log-probabilities are given
        def forward(self, **_):  # type: ignore[no-untyped-def]
            raise AssertionError

    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    pairs = [dpo.Pair(None, None, reference_chosen=-3.5, reference_rejected=-3.5),  # type: ignore[arg-type]
             dpo.Pair(None, None, reference_chosen=-4.5, reference_rejected=-4.5)]  # type: ignore[arg-type]
    original = dpo.pair_logps
    dpo.pair_logps = lambda *_, **__: (chosen, rejected, 10)  # type: ignore[assignment]
    try:
        figures = dpo.figures(Fixed(), pairs, beta=0.5, pad_id=0, device=torch.device("cpu"))
    finally:
        dpo.pair_logps = original  # type: ignore[assignment]
    margins = [0.5 * ((-3 + 3.5) - (-4 + 3.5)), 0.5 * ((-5 + 4.5) - (-4 + 4.5))]  # 0.5 and -0.5
    assert math.isclose(float(figures.loss), sum(-math.log(1 / (1 + math.exp(-m))) for m in margins), rel_tol=1e-6)
    assert figures.correct == 1 and math.isclose(figures.chosen_reward, 0.25 + -0.25, abs_tol=1e-6)
    assert dpo.metrics([figures])["reward_margin"] == 0.0 and dpo.metrics([figures])["reward_accuracy"] == 0.5


def test_dpo_raises_the_reward_margin_and_accuracy_on_held_out_pairs(tiny_model_dir: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path / "job", tiny_model_dir, train=arithmetic_preferences(64),
                    validation=arithmetic_preferences(24, seed=7), method="dpo",
                    hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate": 2e-3, "beta": 0.1},
                    lora={"r": 8, "alpha": 16}, checkpoint_every_steps=16, eval_every_steps=8)
    start = _starting_figures(job, tiny_model_dir)
    # Before the first step the policy is its reference (the adapter disabled): every reward 0, the loss log 2.
    assert start["valid_reward_margin"] == 0 and start["valid_reward_accuracy"] == 0
    assert math.isclose(start["valid_loss"], math.log(2), rel_tol=1e-5)
    assert run(job) == EXIT_DONE
    lines = progress_lines(job)
    steps = [line for line in lines if line["type"] == "step"]
    evals = [line for line in lines if line["type"] == "eval"]
    assert {"loss", "chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy"} <= set(steps[0])
    assert {"valid_loss", "valid_reward_margin", "valid_reward_accuracy"} <= set(evals[-1])
    result = json.loads((job / "out" / "result.json").read_text())
    assert result["valid_reward_accuracy"] >= 0.8 and result["valid_reward_margin"] > 0.5, result
    assert result["valid_loss"] < math.log(2) * 0.6, result
    assert sum(s["reward_margin"] for s in steps[-4:]) > sum(s["reward_margin"] for s in steps[:4])


def test_dpo_on_chat_data_and_chat_training_on_pairs_are_user_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tests.trainer.conftest import arithmetic_chat  # noqa: PLC0415

    job = write_job(tmp_path / "dpo", tiny_model_dir, train=arithmetic_chat(12), method="dpo")
    assert run(job) == EXIT_USER_ERROR
    assert "preference examples" in progress_lines(job)[-1]["message"]
    job = write_job(tmp_path / "sft", tiny_model_dir, train=arithmetic_preferences(12))
    assert run(job) == EXIT_USER_ERROR
    assert "only with the DPO method" in progress_lines(job)[-1]["message"]
    assert JobSpec.model_validate_json((job / "spec.json").read_text()).method == "supervised"


def test_a_dpo_adapter_is_verified_on_held_out_pairs_against_its_reference(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The verification program on a DPO job: the reference scores log 2, the honest adapter less, and the
    validation figure is the one the trainer reported."""
    import shutil  # noqa: PLC0415

    from shared.protocol import VerificationResult  # noqa: PLC0415

    spec = {"method": "dpo", "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate": 2e-3},
            "lora": {"r": 8, "alpha": 16}}
    job = write_job(tmp_path / "train", tiny_model_dir, train=arithmetic_preferences(40), **spec)
    assert run(job) == EXIT_DONE
    result = json.loads((job / "out" / "result.json").read_text())
    check = write_job(tmp_path / "verify", tiny_model_dir, train=arithmetic_preferences(40), kind="verify", **spec)
    (check / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arithmetic_preferences(8, seed=99)))
    (check / "adapter").mkdir()
    shutil.copy(job / "out" / "adapter" / "adapter_model.safetensors", check / "adapter")
    assert run(check) == EXIT_DONE
    figures = VerificationResult.model_validate(json.loads((check / "out" / "verification.json").read_text()))
    assert figures.heldout_base_loss == pytest.approx(math.log(2), rel=1e-5)
    assert figures.heldout_adapter_loss < math.log(2) * 0.7 and figures.heldout_tokens > 0
    assert figures.valid_adapter_loss == pytest.approx(result["valid_loss"], abs=1e-4)


@pytest.mark.parametrize("flat", [False, True], ids=["dense", "flat"])
def test_packed_pairs_score_as_one_sequence_a_row(tiny_model_dir: Path, flat: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Packing the answers' sequences into shared rows changes no log-probability (they never attend across), in
    either batch layout (worker/trainer/attention.py; flat is the GPU's)."""
    from worker.trainer import attention  # noqa: PLC0415

    monkeypatch.setattr(attention, "flat_layout", lambda device: flat)
    from shared.datasets import parse_line  # noqa: PLC0415
    from worker.trainer.data import tokenize_pair  # noqa: PLC0415

    tokenizer = load_tokenizer(tiny_model_dir)
    pairs = [dpo.Pair(*tokenize_pair(parse_line(json.dumps(p).encode()), tokenizer, max_seq_len=256))
             for p in arithmetic_preferences(6)]
    spec = JobSpec(job_id="x", base_model="tunegrid/tiny-llama", model_dir=str(tiny_model_dir), quantization="none")
    model = load_for_training(spec).eval()
    rows, _ = dpo._packed([p.chosen for p in pairs] + [p.rejected for p in pairs], 256)  # noqa: SLF001
    assert len(rows) < 12  # they did share rows
    with torch.no_grad():
        alone = dpo.pair_logps(model, pairs, pad_id=tokenizer.pad_token_id, device=torch.device("cpu"))
        packed = dpo.pair_logps(model, pairs, pad_id=tokenizer.pad_token_id, device=torch.device("cpu"), max_len=256)
    # bfloat16 compute: sums of ~50 token log-probabilities agree to about 3e-5 of their size (3e-3 at -99 on one
    # CPU, 1e-4 on another); attending across sequences would move them by whole units.
    assert torch.allclose(alone[0], packed[0], rtol=1e-4, atol=1e-3)
    assert torch.allclose(alone[1], packed[1], rtol=1e-4, atol=1e-3)
    assert alone[2] == packed[2]  # the same real tokens

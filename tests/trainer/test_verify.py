"""The verification program on the tiny model (4-bit NF4, CPU): an honest adapter is measured as its trainer
reported it and improves on the base on held-out data; the tolerance the coordinator allows is justified against
a change of numerics; an adapter trained on other data, or for a tenth of the steps while claiming the full run's
loss, lands outside it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from coordinator.settings import CoordinatorSettings
from coordinator.services.verification import compare
from shared.protocol import VerificationResult
from tests.trainer.conftest import arithmetic_chat, write_job
from worker.trainer.__main__ import run

SETTINGS = CoordinatorSettings()
TRAIN, HELD_OUT = arithmetic_chat(48, seed=1), arithmetic_chat(8, seed=99)


def spelling(n: int) -> list[dict]:  # type: ignore[type-arg]
    words = ["cat", "dog", "tree", "house", "river", "stone", "cloud", "light", "green", "table"]
    return [{"messages": [{"role": "user", "content": f"Spell {words[i % 10]} backwards."},
                          {"role": "assistant", "content": words[i % 10][::-1]}]} for i in range(n)]


def train(tmp: Path, model_dir: Path, data: list[dict], **hp: object) -> tuple[Path, dict]:  # type: ignore[type-arg]
    job = write_job(tmp, model_dir, train=data, packing=False,
                    hyperparameters={"n_epochs": 3, "batch_size": 4, "learning_rate": 3e-3, **hp})
    assert run(job) == 0
    return job / "out" / "adapter" / "adapter_model.safetensors", json.loads((job / "out" / "result.json").read_text())


def verify(tmp: Path, model_dir: Path, adapter: Path) -> VerificationResult:
    """The customer's job (its training data, as the trainer got it) verified against `adapter`."""
    job = write_job(tmp, model_dir, train=TRAIN, kind="verify", packing=False,
                    hyperparameters={"n_epochs": 3, "batch_size": 4, "learning_rate": 3e-3})
    (job / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HELD_OUT))
    (job / "adapter").mkdir()
    shutil.copy(adapter, job / "adapter" / "adapter_model.safetensors")
    assert run(job) == 0
    return VerificationResult.model_validate(json.loads((job / "out" / "verification.json").read_text()))


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, dict]:  # type: ignore[type-arg]
    return train(tmp_path_factory.mktemp("honest"), tiny_model_dir, TRAIN)


def test_an_honest_adapter_is_measured_as_reported_and_improves_on_held_out_data(
    honest: tuple[Path, dict], tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,  # type: ignore[type-arg]
) -> None:
    adapter, result = honest
    figures = verify(tmp_path / "same", tiny_model_dir, adapter)
    assert figures.heldout_tokens > 0 and figures.valid_tokens > 0
    assert figures.valid_adapter_loss == pytest.approx(result["valid_loss"], abs=1e-4)  # same rows, same numerics
    assert figures.heldout_base_loss - figures.heldout_adapter_loss > SETTINGS.verify_min_improvement  # type: ignore[operator]
    assert compare({"final_eval_loss": result["valid_loss"]}, figures, SETTINGS, held_out=True) is None

    # Another machine's numerics (here: fp32 compute instead of bf16 around the 4-bit weights) move the figure a
    # little; the tolerance is set well above that.
    import worker.trainer.model as models  # noqa: PLC0415
    import torch  # noqa: PLC0415

    monkeypatch.setattr(models, "compute_dtype", lambda: torch.float32)
    other = verify(tmp_path / "fp32", tiny_model_dir, adapter)
    gap = abs(other.valid_adapter_loss - result["valid_loss"])  # type: ignore[operator]
    allowed = SETTINGS.verify_tolerance + SETTINGS.verify_tolerance_share * result["valid_loss"]
    print(f"validation loss: reported {result['valid_loss']:.4f}, fp32 verifier {other.valid_adapter_loss:.4f}, "
          f"gap {gap:.4f}, allowed {allowed:.4f}")
    assert gap < allowed / 2
    assert compare({"final_eval_loss": result["valid_loss"]}, other, SETTINGS, held_out=True) is None


def test_an_adapter_trained_on_other_data_disagrees(honest: tuple[Path, dict], tmp_path: Path,  # type: ignore[type-arg]
                                                    tiny_model_dir: Path) -> None:
    foreign, foreign_result = train(tmp_path / "foreign", tiny_model_dir, spelling(48))
    figures = verify(tmp_path / "check", tiny_model_dir, foreign)
    _, result = honest
    # Measured here: 5.45 on the customer's validation rows, against 4.74 (the honest run) or 4.86 (its own).
    for claimed in (result["valid_loss"], foreign_result["valid_loss"]):  # the honest run's figure, or its own
        why = compare({"final_eval_loss": claimed}, figures, SETTINGS, held_out=True)
        assert why is not None, (claimed, figures)


def test_a_tenth_of_the_steps_claiming_the_full_runs_loss_disagrees(honest: tuple[Path, dict], tmp_path: Path,  # type: ignore[type-arg]
                                                                     tiny_model_dir: Path) -> None:
    short, _ = train(tmp_path / "short", tiny_model_dir, TRAIN, n_epochs=1, batch_size=12)  # 4 steps of the honest 33
    figures = verify(tmp_path / "check", tiny_model_dir, short)
    _, result = honest
    assert figures.heldout_base_loss - figures.heldout_adapter_loss > SETTINGS.verify_min_improvement  # type: ignore[operator]
    why = compare({"final_eval_loss": result["valid_loss"]}, figures, SETTINGS, held_out=True)  # measured here: 5.70 against 4.74
    assert why is not None and "the trainer reported validation loss" in why, figures

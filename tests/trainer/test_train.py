"""QLoRA on the CPU end to end: loss falls, checkpoints land, the adapter loads on a fresh 4-bit base and helps."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from coordinator.services.adapters import verify_adapter
from shared.catalog import get_base_model
from shared.checkpoint import MEMBERS, CheckpointRules, check_file
from shared.jobspec import JobSpec
from shared.memory import lora_parameters
from worker.files import pack_dir
from tests.trainer.conftest import arithmetic_chat, progress_lines, write_job
from worker.trainer.__main__ import run
from worker.trainer.data import read_examples
from worker.trainer.errors import EXIT_DONE
from worker.trainer.model import load_adapter, load_base, load_tokenizer


def _eval_loss(model, job_dir: Path, model_dir: Path) -> float:  # type: ignore[no-untyped-def]
    from shared.jobspec import JobSpec
    from worker.trainer.progress import Progress
    from worker.trainer.train import Trainer

    spec = JobSpec.model_validate_json((job_dir / "spec.json").read_text())
    trainer = Trainer(spec, job_dir, Progress(job_dir / "eval.jsonl"))
    rows = trainer._rows(read_examples(job_dir / "validation.jsonl"), load_tokenizer(model_dir))
    return trainer.evaluate(model, rows, load_tokenizer(model_dir).pad_token_id)  # type: ignore[return-value]


def test_qlora_on_cpu_learns_and_the_adapter_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path / "job", tiny_model_dir, train=arithmetic_chat(160), validation=arithmetic_chat(24, seed=9),
                    hyperparameters={"n_epochs": 6, "batch_size": 4, "learning_rate": 3e-3},
                    lora={"r": 8, "alpha": 16}, checkpoint_every_steps=10, eval_every_steps=10)
    assert run(job) == EXIT_DONE
    lines = progress_lines(job)
    kinds = [line["type"] for line in lines]
    assert kinds[0] == "started" and kinds[-1] == "finished" and "eval" in kinds and "checkpoint" in kinds
    losses = [line["loss"] for line in lines if line["type"] == "step"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 * 0.85, losses
    step = next(line for line in lines if line["type"] == "step")
    assert {"epoch", "learning_rate", "tokens", "tokens_per_s", "eta_s", "peak_memory_bytes"} <= set(step)

    out = job / "out"
    assert {p.name for p in (out / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    result = json.loads((out / "result.json").read_text())
    assert result["trained_tokens"] > 0 and len(result["adapter_sha256"]) == 64
    with tarfile.open(out / "adapter.tar.gz") as tar:
        assert "adapter/adapter_model.safetensors" in tar.getnames()
    # The coordinator's completion checks accept what the real trainer writes.
    facts = verify_adapter(out / "adapter.tar.gz", base=get_base_model("tunegrid/tiny-llama"),
                           lora={"r": 8, "alpha": 16, "target_modules": "all-linear"}, final_loss=losses[-1],
                           reported_losses=losses, max_bytes=10**8)
    assert facts.parameters == lora_parameters(get_base_model("tunegrid/tiny-llama"), r=8)
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert checkpoints and all(sorted(p.name for p in c.iterdir()) == sorted(MEMBERS) for c in checkpoints)
    assert not [c for c in checkpoints if c.name.startswith(".")]  # no half-written checkpoint left
    # The coordinator's upload checks accept what the real trainer writes, packed as the agent packs it.
    spec = JobSpec.model_validate_json((job / "spec.json").read_bytes())
    for folder in checkpoints:
        step = int(folder.name.removeprefix("step-"))
        archive = pack_dir(folder, tmp_path / f"{folder.name}.tar.gz", arcname="resume")
        assert check_file(archive, CheckpointRules.for_spec(spec, max_step=step, gpu=False), step=step).step == step

    base_loss = _eval_loss(load_base(tiny_model_dir, quantization="nf4", gradient_checkpointing=False), job,
                           tiny_model_dir)
    tuned_loss = _eval_loss(load_adapter(tiny_model_dir, out / "adapter"), job, tiny_model_dir)
    assert tuned_loss < base_loss * 0.9, (base_loss, tuned_loss)

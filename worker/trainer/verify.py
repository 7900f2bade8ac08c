"""The verification program (`spec.kind == "verify"`): another worker's adapter and the base model, evaluated on
data that adapter's trainer never received.

Reads `spec.json`, `train.jsonl` and `validation.jsonl` (what the trainer got: its validation rows are rebuilt
exactly as the trainer split them), `held_out.jsonl` (the coordinator's held-out sample) and
`adapter/adapter_model.safetensors`. The adapter is data, never code: its tensors are loaded into LoRA layers
built from the job's own spec (PEFT's config file of the archive is not read), after checking names, shapes and
that every value is finite. Writes `out/verification.json`: the mean token loss of the base (the adapter
disabled) and of the adapter on the held-out sample and on the validation rows, with the tokens each counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


from shared.jobspec import JobSpec
from worker.trainer import data, dpo, model as models
from worker.trainer.checkpoints import BadAdapter, load_adapter_weights
from worker.trainer.errors import UserError
from worker.trainer.progress import Progress
from worker.trainer.train import Preference, Trainer

ADAPTER = Path("adapter") / "adapter_model.safetensors"


def _loss(trainer: Trainer, model, rows: list[data.PackedRow], pad_id: int) -> tuple[float | None, int]:  # type: ignore[no-untyped-def]
    tokens = sum(sum(1 for label in r.labels[1:] if label != data.IGNORE) for r in rows)
    return trainer.evaluate(model, rows, pad_id), tokens


def run(spec: JobSpec, job_dir: Path, progress: Progress) -> dict[str, Any]:
    if spec.method == "dpo":
        return run_preference(spec, job_dir, progress)
    trainer = Trainer(spec, job_dir, progress)
    model_dir = Path(spec.model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"no model at {model_dir} (config.json missing)")
    tokenizer = models.load_tokenizer(model_dir)
    _, valid_rows = trainer._load_data(tokenizer)  # noqa: SLF001 - the very split the trainer made
    held = job_dir / "held_out.jsonl"
    held_rows = trainer._rows(data.read_examples(held), tokenizer) if held.is_file() else []  # noqa: SLF001
    model = models.with_lora(models.load_base(model_dir, quantization=spec.quantization, gradient_checkpointing=False),
                             spec)
    try:
        load_adapter_weights(model, job_dir / ADAPTER)
    except BadAdapter as exc:
        progress.emit("warning", message=str(exc))
        return {"adapter_error": str(exc)[:500]}
    progress.emit("started", total_steps=0, kind="verify", device=str(trainer.device), held_out_rows=len(held_rows),
                  valid_rows=len(valid_rows))
    pad_id = tokenizer.pad_token_id
    result: dict[str, Any] = {}
    for name, rows in (("heldout", held_rows), ("valid", valid_rows)):
        adapter_loss, tokens = _loss(trainer, model, rows, pad_id)
        with model.disable_adapter():
            base_loss, _ = _loss(trainer, model, rows, pad_id)
        result.update({f"{name}_base_loss": base_loss, f"{name}_adapter_loss": adapter_loss,
                       f"{name}_tokens": tokens if rows else 0})
        progress.emit("measured", split=name, base_loss=base_loss, adapter_loss=adapter_loss)  # the agent relays none
    return result


def run_preference(spec: JobSpec, job_dir: Path, progress: Progress) -> dict[str, Any]:
    """A DPO job's adapter: the DPO loss (and rewards) of the held-out and validation pairs against the job's
    reference policy (the base, or the adapter the job continued from). The reference itself scores log 2 (every
    reward 0): that is the "base" figure an adapter must beat."""
    trainer = Trainer(spec, job_dir, progress)
    model_dir = Path(spec.model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"no model at {model_dir} (config.json missing)")
    tokenizer = models.load_tokenizer(model_dir)
    objective = trainer.objective(tokenizer)
    assert isinstance(objective, Preference)
    held = job_dir / "held_out.jsonl"
    held_pairs = trainer._pairs(data.read_examples(held), tokenizer) if held.is_file() else []  # noqa: SLF001
    model = models.with_lora(models.load_base(model_dir, quantization=spec.quantization, gradient_checkpointing=False),
                             spec)
    if spec.initial_adapter:
        trainer._load_initial_adapter(model)  # noqa: SLF001 - the reference, as the trainer had it
    objective.units = held_pairs  # the reference log-probabilities of both sets, as the trainer computes them
    objective.prepare(model, adapter_is_reference=spec.initial_adapter)
    reference = {name: _reference_figures(objective, model, pairs, spec.initial_adapter)
                 for name, pairs in (("heldout", held_pairs), ("valid", objective.valid))}
    try:
        load_adapter_weights(model, job_dir / ADAPTER)
    except BadAdapter as exc:
        progress.emit("warning", message=str(exc))
        return {"adapter_error": str(exc)[:500]}
    progress.emit("started", total_steps=0, kind="verify", device=str(trainer.device), held_out_rows=len(held_pairs),
                  valid_rows=len(objective.valid))
    result: dict[str, Any] = {}
    for name, pairs in (("heldout", held_pairs), ("valid", objective.valid)):
        adapter = objective.evaluate(model, pairs)
        result.update({f"{name}_base_loss": (reference[name] or {}).get("valid_loss"),
                       f"{name}_adapter_loss": (adapter or {}).get("valid_loss"),
                       f"{name}_tokens": dpo.answer_tokens(pairs)})
        progress.emit("measured", split=name, base_loss=result[f"{name}_base_loss"],
                      adapter_loss=result[f"{name}_adapter_loss"])
    return result


def _reference_figures(objective: Preference, model, pairs: list[dpo.Pair], adapter_is_reference: bool):  # type: ignore[no-untyped-def]
    if adapter_is_reference:
        return objective.evaluate(model, pairs)
    with model.disable_adapter():
        return objective.evaluate(model, pairs)

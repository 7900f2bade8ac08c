"""The training loop: batches of the job's objective (supervised or DPO), LoRA steps, evaluation, early stopping,
atomic checkpoints, resume, the final adapter."""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import signal
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import get_cosine_schedule_with_warmup

from shared.catalog import find_base_model
from shared.datasets import TrainingExample
from shared.jobspec import JobSpec
from shared.memory import micro_batch
from worker.trainer import checkpoints, data, dpo, model as models
from worker.trainer.early_stopping import EarlyStopping
from worker.trainer.batches import Batch, batch_loss, collate  # noqa: F401 - Batch and collate: the trainer's API
from worker.trainer.errors import UserError, WorkerError, is_out_of_memory
from worker.trainer.progress import Progress

INITIAL_ADAPTER = Path("initial") / "adapter_model.safetensors"


@dataclass
class StepFigures:
    loss: float
    tokens: int
    extra: dict[str, float] = field(default_factory=dict)


class Supervised:
    """Next-token loss over the labelled tokens of packed rows."""

    def __init__(self, trainer: Trainer, train: list[data.PackedRow], valid: list[data.PackedRow], pad_id: int) -> None:
        self.trainer, self.units, self.valid, self.pad_id = trainer, train, valid, pad_id

    def prepare(self, model, *, adapter_is_reference: bool) -> None:  # type: ignore[no-untyped-def]
        pass

    def step(self, model, chunk: list[data.PackedRow]) -> StepFigures:  # type: ignore[no-untyped-def]
        size = self.trainer.batch_size()
        batches = [collate(chunk[s:s + size], pad_id=self.pad_id, device=self.trainer.device)
                   for s in range(0, len(chunk), size)]
        labelled = sum(b.labelled for b in batches)
        total = 0.0
        for batch in batches:
            loss, _ = batch_loss(model, batch)
            (loss / max(labelled, 1)).backward()
            total += loss.item()
        return StepFigures(loss=total / max(labelled, 1), tokens=sum(b.tokens for b in batches))

    def evaluate(self, model) -> dict[str, float] | None:  # type: ignore[no-untyped-def]
        loss = self.trainer.evaluate(model, self.valid, self.pad_id)
        return None if loss is None else {"valid_loss": round(loss, 6)}


class Preference:
    """DPO over preference pairs (worker/trainer/dpo.py)."""

    def __init__(self, trainer: Trainer, train: list[dpo.Pair], valid: list[dpo.Pair], pad_id: int) -> None:
        self.trainer, self.units, self.valid, self.pad_id = trainer, train, valid, pad_id
        self.beta = trainer.spec.hyperparameters.beta

    @property
    def max_len(self) -> int | None:
        """Pairs' sequences are packed into rows as supervised examples are (or one a row without packing)."""
        return self.trainer.spec.max_seq_len if self.trainer.spec.packing else None

    def prepare(self, model, *, adapter_is_reference: bool) -> None:  # type: ignore[no-untyped-def]
        dpo.set_reference(model, self.units + self.valid, batch_size=self.trainer.batch_size(), pad_id=self.pad_id,
                          device=self.trainer.device, adapter_is_reference=adapter_is_reference, max_len=self.max_len)

    def step(self, model, chunk: list[dpo.Pair]) -> StepFigures:  # type: ignore[no-untyped-def]
        size = self.trainer.batch_size()
        parts = []
        for start in range(0, len(chunk), size):
            part = dpo.figures(model, chunk[start:start + size], beta=self.beta, pad_id=self.pad_id,
                               device=self.trainer.device, max_len=self.max_len)
            (part.loss / len(chunk)).backward()
            parts.append(part)
        figures = dpo.metrics(parts)
        return StepFigures(loss=figures.pop("loss"), tokens=sum(p.tokens for p in parts), extra=figures)

    def evaluate(self, model, pairs: list[dpo.Pair] | None = None) -> dict[str, float] | None:  # type: ignore[no-untyped-def]
        return dpo.evaluate(model, self.valid if pairs is None else pairs, beta=self.beta,
                            batch_size=self.trainer.batch_size(), pad_id=self.pad_id, device=self.trainer.device,
                            max_len=self.max_len)


class Trainer:
    def __init__(self, spec: JobSpec, job_dir: Path, progress: Progress) -> None:
        self.spec = spec
        self.job_dir = job_dir
        self.out = job_dir / "out"
        self.progress = progress
        self.stop_requested = False
        self.device = models.device()
        self.rows = 0  # training units (packed rows, or pairs): part of the data order a checkpoint records
        self.early_stopping = EarlyStopping(spec.early_stopping_patience) if spec.early_stopping_patience else None
        self._last_eval: dict[str, float] | None = None

    def request_stop(self, *_: Any) -> None:
        self.stop_requested = True

    # -- data ---------------------------------------------------------------
    def _warn_truncated(self, count: int) -> None:
        if count:
            self.progress.emit("warning", message=f"{count} examples were longer than max_seq_len="
                                                  f"{self.spec.max_seq_len} tokens and were truncated")

    def _check_tools(self, examples: list[TrainingExample], tokenizer) -> None:  # type: ignore[no-untyped-def]
        if any(e.uses_tools for e in examples):
            data.check_expresses_tools(tokenizer, self.spec.base_model)

    def _rows(self, examples, tokenizer) -> list[data.PackedRow]:  # type: ignore[no-untyped-def]
        self._check_tools(examples, tokenizer)
        tokenized = [data.tokenize(e, tokenizer, max_seq_len=self.spec.max_seq_len,
                                   train_on_inputs=self.spec.train_on_inputs) for e in examples]
        self._warn_truncated(sum(t.truncated for t in tokenized))
        tokenized = [t for t in tokenized if any(label != data.IGNORE for label in t.labels)]
        if not tokenized:
            raise UserError("no example has any token to train on after tokenization and truncation")
        if self.spec.packing:
            return data.pack(tokenized, max_seq_len=self.spec.max_seq_len)
        return data.unpacked(tokenized)

    def _pairs(self, examples, tokenizer) -> list[dpo.Pair]:  # type: ignore[no-untyped-def]
        self._check_tools(examples, tokenizer)
        pairs = [dpo.Pair(*data.tokenize_pair(e, tokenizer, max_seq_len=self.spec.max_seq_len)) for e in examples]
        self._warn_truncated(sum(p.chosen.truncated or p.rejected.truncated for p in pairs))
        pairs = [p for p in pairs if all(any(label != data.IGNORE for label in side.labels)
                                         for side in (p.chosen, p.rejected))]
        if not pairs:
            raise UserError("no preference pair keeps tokens of both answers after tokenization and truncation")
        return pairs

    def _examples(self) -> tuple[list[TrainingExample], list[TrainingExample]]:
        train_path = self.job_dir / "train.jsonl"
        if not train_path.is_file():
            raise UserError("train.jsonl is missing from the job directory")
        examples = data.read_examples(train_path)
        validation_path = self.job_dir / "validation.jsonl"
        if validation_path.is_file():
            validation = data.read_examples(validation_path)
        else:
            held_out = int(len(examples) * self.spec.validation_fraction)
            random.Random(self.spec.seed).shuffle(examples)
            validation, examples = examples[:held_out], examples[held_out:]
        if not examples:
            raise UserError("the training data is empty")
        return examples, validation

    def _load_data(self, tokenizer):  # type: ignore[no-untyped-def]
        examples, validation = self._examples()
        return self._rows(examples, tokenizer), (self._rows(validation, tokenizer) if validation else [])

    def objective(self, tokenizer) -> Supervised | Preference:  # type: ignore[no-untyped-def]
        examples, validation = self._examples()
        preference = [e.format == "preference" for e in examples + validation]
        if self.spec.method == "dpo":
            if not all(preference):
                raise UserError("the DPO method trains on preference examples (input, preferred_output, "
                                "non_preferred_output); this data is in another format")
            return Preference(self, self._pairs(examples, tokenizer),
                              self._pairs(validation, tokenizer) if validation else [], tokenizer.pad_token_id)
        if any(preference):
            raise UserError("preference examples train only with the DPO method (method.type \"dpo\")")
        return Supervised(self, self._rows(examples, tokenizer),
                          self._rows(validation, tokenizer) if validation else [], tokenizer.pad_token_id)

    # -- loop ---------------------------------------------------------------
    def batch_size(self) -> int:
        sequences = 2 if self.spec.method == "dpo" else 1  # a pair is two sequences
        return micro_batch(self.spec.hyperparameters.batch_size, max_seq_len=self.spec.max_seq_len, sequences=sequences)

    def evaluate(self, model, rows: list[data.PackedRow], pad_id: int) -> float | None:  # type: ignore[no-untyped-def]
        if not rows:
            return None
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size()):
                batch = collate(rows[start:start + self.batch_size()], pad_id=pad_id, device=self.device)
                loss, n = batch_loss(model, batch)
                total, count = total + float(loss), count + n
        model.train()
        return total / max(count, 1)

    def _load_initial_adapter(self, model) -> None:  # type: ignore[no-untyped-def]
        """The adapter the job continues from; the coordinator checked it and the agent its sha256, so one that
        does not fit this job's LoRA layers is the request's problem."""
        path = self.job_dir / INITIAL_ADAPTER
        if os.path.islink(path) or not path.is_file():
            raise UserError("the adapter to continue from is missing from the job directory")
        try:
            checkpoints.load_adapter_weights(model, path)
        except checkpoints.BadAdapter as exc:
            raise UserError(f"the adapter to continue from does not fit this job: {exc}") from None

    def run(self) -> dict[str, Any]:
        spec, hp = self.spec, self.spec.hyperparameters
        torch.manual_seed(spec.seed)
        random.seed(spec.seed)
        if find_base_model(spec.base_model) is None:
            raise UserError(f"unknown base model {spec.base_model!r}: not in the catalog")
        model_dir = Path(spec.model_dir)
        if not (model_dir / "config.json").is_file():
            raise UserError(f"no model at {model_dir} (config.json missing)")
        tokenizer = models.load_tokenizer(model_dir)
        objective = self.objective(tokenizer)
        units = objective.units
        if self.early_stopping is not None and not objective.valid:
            raise UserError("early stopping needs validation data: give a validation file, or leave part of the "
                            "training file for validation")
        model = models.load_for_training(spec)
        model.train()
        if spec.initial_adapter:
            self._load_initial_adapter(model)
        objective.prepare(model, adapter_is_reference=spec.initial_adapter)  # before any resumed weights load
        if torch.cuda.is_available():  # the peak a step reports is training's, not loading's (which quantizes)
            torch.cuda.reset_peak_memory_stats()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        batches_per_epoch = math.ceil(len(units) / self.batch_size())
        steps_per_epoch = math.ceil(batches_per_epoch / hp.gradient_accumulation_steps)
        total_steps = steps_per_epoch * hp.n_epochs
        scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(total_steps * hp.warmup_ratio), total_steps)
        self.rows = len(units)
        step, trained_tokens = self._resume(model, optimizer, scheduler, total_steps, objective)
        stopped_early = False
        resumed_from = step
        self.progress.emit("started", total_steps=total_steps, resumed_from_step=step, examples_rows=len(units),
                           device=str(self.device), quantization=spec.quantization, method=spec.method)
        began, tokens_at_start = time.monotonic(), trained_tokens
        peak_rss = 0
        per_step = hp.gradient_accumulation_steps * self.batch_size()
        while step < total_steps:
            epoch, step_in_epoch = divmod(step, steps_per_epoch)
            order = torch.randperm(len(units), generator=torch.Generator().manual_seed(spec.seed + epoch))
            chunk = [units[int(i)] for i in order[step_in_epoch * per_step:(step_in_epoch + 1) * per_step]]
            optimizer.zero_grad(set_to_none=True)
            try:
                figures = objective.step(model, chunk)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                raise WorkerError(self._out_of_memory(step + 1)) from None
            trained_tokens += figures.tokens
            torch.nn.utils.clip_grad_norm_(trainable, hp.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            elapsed = time.monotonic() - began
            peak_rss = max(peak_rss, _peak_memory_bytes())
            self.progress.emit("step", step=step, epoch=epoch + 1, loss=round(figures.loss, 6),
                               learning_rate=scheduler.get_last_lr()[0], tokens=trained_tokens,
                               tokens_per_s=round((trained_tokens - tokens_at_start) / max(elapsed, 1e-9), 1),
                               eta_s=round(elapsed / (step - resumed_from) * (total_steps - step), 1),
                               peak_memory_bytes=peak_rss, **figures.extra)
            if step % spec.eval_every_steps == 0 and step < total_steps:
                stopped_early = self._stop_early(model, self._emit_eval(model, objective, step), step)
            if stopped_early:
                break
            if step % spec.checkpoint_every_steps == 0 or self.stop_requested:
                self.checkpoint(model, optimizer, scheduler, step, trained_tokens)
            if self.stop_requested and step < total_steps:
                return {"preempted_at_step": step}
        if not stopped_early:
            self._stop_early(model, self._emit_eval(model, objective, step), step)
        if self.early_stopping is None:
            return self._finish(model, step, trained_tokens, self._last_eval)
        return self._finish_best(model, objective, step, trained_tokens, stopped_early)

    def _out_of_memory(self, step: int) -> str:
        """What the customer reads when a micro-batch does not fit: which one, and what they can ask instead
        (`batch_size` and `min_vram_gb` are theirs to set; the sequence length and accumulation are not)."""
        rows = self.batch_size()
        what = "pairs" if self.spec.method == "dpo" else "rows"
        where, more = "this machine's memory", "a worker with more memory"
        if torch.cuda.is_available():
            where = f"the GPU's memory ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
            more = "a GPU with more memory (min_vram_gb)"
        told = f"{where} ran out at step {step}: a micro-batch of {rows} {what} of up to " \
               f"{self.spec.max_seq_len} tokens does not fit beside the model"
        if rows > 1:
            return f"{told}; lower batch_size to {rows // 2} (each step then learns from fewer examples), or ask for {more}"
        return f"{told}, even at batch_size 1; ask for {more}"

    def _stop_early(self, model, evaluation: dict[str, float] | None, step: int) -> bool:  # type: ignore[no-untyped-def]
        self._last_eval = evaluation
        if self.early_stopping is None or evaluation is None:
            return False
        return self.early_stopping.evaluated(model, step, evaluation["valid_loss"])

    def _finish_best(self, model, objective, step: int, trained_tokens: int, stopped_early: bool) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        """The result with early stopping: the best evaluation's adapter, and which step that was and why."""
        stopping = self.early_stopping
        assert stopping is not None and stopping.best_step is not None
        stopping.keep_best(model, step)
        evaluation = objective.evaluate(model) if stopping.best_step != step else self._last_eval
        if stopped_early:
            reason = (f"validation loss did not improve for {stopping.patience} evaluation"
                      f"{'s' if stopping.patience != 1 else ''} after step {stopping.best_step}")
        else:
            reason = f"training ran all its steps; the best validation loss was at step {stopping.best_step}"
        self.progress.emit("early_stopping", stopped_early=stopped_early, stopped_at_step=step,
                           best_step=stopping.best_step, best_valid_loss=stopping.best_valid_loss, reason=reason)
        return {**self._finish(model, step, trained_tokens, evaluation), "best_step": stopping.best_step,
                "stopped_early": stopped_early, "early_stopping_reason": reason}

    def _emit_eval(self, model, objective: Supervised | Preference, step: int) -> dict[str, float] | None:  # type: ignore[no-untyped-def]
        evaluation = objective.evaluate(model)
        if evaluation is not None:
            self.progress.emit("eval", step=step, **evaluation)
        return evaluation

    # -- checkpoints ----------------------------------------------------------
    def checkpoint(self, model, optimizer, scheduler, step: int, trained_tokens: int) -> Path:  # type: ignore[no-untyped-def]
        """Write `out/checkpoints/step-N` atomically (tensors and JSON, `shared.checkpoint`)."""
        final = self.out / "checkpoints" / f"step-{step}"
        final.parent.mkdir(parents=True, exist_ok=True)
        stopping = self.early_stopping
        checkpoints.write_atomically(final, model=model, optimizer=optimizer, scheduler=scheduler, spec=self.spec,
                                     step=step, trained_tokens=trained_tokens, rows=self.rows,
                                     early_stopping=stopping.state() if stopping else None,
                                     best_adapter=stopping.best_adapter if stopping else None)
        self.progress.emit("checkpoint", step=step, sha256=_tree_sha256(final))
        return final

    def _resume(self, model, optimizer, scheduler, total_steps: int, objective) -> tuple[int, int]:  # type: ignore[no-untyped-def]
        """(step, trained tokens) of the checkpoint in `resume/`, checked, then loaded into the model and
        optimizer (and early stopping's record); (0, 0) without one."""
        resume = self.job_dir / "resume"
        if not os.path.lexists(resume):
            return 0, 0
        restored = checkpoints.load(resume, model=model, optimizer=optimizer, scheduler=scheduler, spec=self.spec,
                                    total_steps=total_steps)
        if self.early_stopping is not None:
            self.early_stopping.resumed(model, restored, lambda: objective.evaluate(model)["valid_loss"])
        return restored.step, restored.trained_tokens

    def _finish(self, model, step: int, trained_tokens: int, evaluation: dict[str, float] | None) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        adapter = self.out / "adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        model.save_pretrained(adapter)
        archive = self.out / "adapter.tar.gz"
        with tarfile.open(archive, "w:gz", format=tarfile.USTAR_FORMAT) as tar:  # plain tar, as checkpoints are
            for path in sorted(adapter.iterdir()):
                tar.add(path, arcname=f"adapter/{path.name}")
        return {"steps": step, "trained_tokens": trained_tokens, "valid_loss": (evaluation or {}).get("valid_loss"),
                "adapter_sha256": _sha256(archive), "adapter_bytes": archive.stat().st_size,
                **{k: v for k, v in (evaluation or {}).items() if k != "valid_loss"}}


def _peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _tree_sha256(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + _sha256(path).encode())
    return digest.hexdigest()


def install_stop_handler(trainer: Trainer) -> None:
    signal.signal(signal.SIGTERM, trainer.request_stop)

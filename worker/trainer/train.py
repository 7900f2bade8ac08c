"""The training loop: packed batches, LoRA steps, evaluation, atomic checkpoints, resume, the final adapter."""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import signal
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import get_cosine_schedule_with_warmup

from shared.catalog import find_base_model
from shared.jobspec import JobSpec
from worker.trainer import checkpoints, data, model as models
from worker.trainer.errors import UserError
from worker.trainer.progress import Progress

CPU_AUTO_BATCH_TOKENS = 4096


@dataclass
class Batch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor  # next-token labels, IGNORE across example boundaries and padding
    attention_mask: torch.Tensor  # (B, 1, L, L) bool: True where a token may attend
    tokens: int


def collate(rows: list[data.PackedRow], *, pad_id: int, device: torch.device) -> Batch:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    targets = torch.full((len(rows), length), data.IGNORE, dtype=torch.long)
    segments = torch.zeros((len(rows), length), dtype=torch.long)  # 0: padding
    for i, row in enumerate(rows):
        n = len(row)
        ids[i, :n] = torch.tensor(row.input_ids)
        positions[i, :n] = torch.tensor(row.position_ids)
        segments[i, :n] = torch.tensor(row.segment_ids)
        labels = torch.tensor(row.labels)
        same_example = segments[i, 1:n] == segments[i, : n - 1]
        targets[i, : n - 1] = torch.where(same_example, labels[1:], data.IGNORE)
    causal = torch.ones((length, length), dtype=torch.bool).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal & (segments[:, None, :] > 0)
    allowed |= torch.eye(length, dtype=torch.bool)  # padding rows attend to themselves (no NaN)
    return Batch(ids.to(device), positions.to(device), targets.to(device), allowed[:, None].to(device),
                 tokens=int((segments > 0).sum()))


def batch_loss(model, batch: Batch) -> tuple[torch.Tensor, int]:  # type: ignore[no-untyped-def]
    """Sum of token losses and how many tokens carry loss."""
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                   attention_mask=batch.attention_mask).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(),
                                             ignore_index=data.IGNORE, reduction="sum")
    return loss, int((batch.targets != data.IGNORE).sum())


class Trainer:
    def __init__(self, spec: JobSpec, job_dir: Path, progress: Progress) -> None:
        self.spec = spec
        self.job_dir = job_dir
        self.out = job_dir / "out"
        self.progress = progress
        self.stop_requested = False
        self.device = models.device()
        self.rows = 0  # packed training rows: part of the data order a checkpoint records

    def request_stop(self, *_: Any) -> None:
        self.stop_requested = True

    # -- data ---------------------------------------------------------------
    def _rows(self, examples, tokenizer) -> list[data.PackedRow]:  # type: ignore[no-untyped-def]
        tokenized = [data.tokenize(e, tokenizer, max_seq_len=self.spec.max_seq_len,
                                   train_on_inputs=self.spec.train_on_inputs) for e in examples]
        truncated = sum(t.truncated for t in tokenized)
        if truncated:
            self.progress.emit("warning", message=f"{truncated} examples were longer than max_seq_len="
                                                  f"{self.spec.max_seq_len} tokens and were truncated")
        tokenized = [t for t in tokenized if any(label != data.IGNORE for label in t.labels)]
        if not tokenized:
            raise UserError("no example has any token to train on after tokenization and truncation")
        if self.spec.packing:
            return data.pack(tokenized, max_seq_len=self.spec.max_seq_len)
        return data.unpacked(tokenized)

    def _load_data(self, tokenizer):  # type: ignore[no-untyped-def]
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
        return self._rows(examples, tokenizer), (self._rows(validation, tokenizer) if validation else [])

    # -- loop ---------------------------------------------------------------
    def batch_size(self) -> int:
        size = self.spec.hyperparameters.batch_size
        return size if size != "auto" else max(1, min(8, CPU_AUTO_BATCH_TOKENS // self.spec.max_seq_len))

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
        train_rows, valid_rows = self._load_data(tokenizer)
        model = models.load_for_training(spec)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        batches_per_epoch = math.ceil(len(train_rows) / self.batch_size())
        steps_per_epoch = math.ceil(batches_per_epoch / hp.gradient_accumulation_steps)
        total_steps = steps_per_epoch * hp.n_epochs
        scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(total_steps * hp.warmup_ratio), total_steps)
        self.rows = len(train_rows)
        step, trained_tokens = self._resume(model, optimizer, scheduler, total_steps)
        pad_id = tokenizer.pad_token_id
        resumed_from = step
        self.progress.emit("started", total_steps=total_steps, resumed_from_step=step, examples_rows=len(train_rows),
                           device=str(self.device), quantization=spec.quantization)
        began, tokens_at_start = time.monotonic(), trained_tokens
        peak_rss = 0
        while step < total_steps:
            epoch, step_in_epoch = divmod(step, steps_per_epoch)
            order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(spec.seed + epoch))
            first = step_in_epoch * hp.gradient_accumulation_steps * self.batch_size()
            chunk = [train_rows[int(i)] for i in order[first:first + hp.gradient_accumulation_steps * self.batch_size()]]
            optimizer.zero_grad(set_to_none=True)
            batches = [collate(chunk[s:s + self.batch_size()], pad_id=pad_id, device=self.device)
                       for s in range(0, len(chunk), self.batch_size())]
            labelled = sum(int((b.targets != data.IGNORE).sum()) for b in batches)
            step_loss = 0.0
            for batch in batches:
                loss, _ = batch_loss(model, batch)
                (loss / max(labelled, 1)).backward()
                step_loss += loss.item()
                trained_tokens += batch.tokens
            torch.nn.utils.clip_grad_norm_(trainable, hp.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            elapsed = time.monotonic() - began
            peak_rss = max(peak_rss, _peak_memory_bytes())
            self.progress.emit("step", step=step, epoch=epoch + 1, loss=round(step_loss / max(labelled, 1), 6),
                               learning_rate=scheduler.get_last_lr()[0], tokens=trained_tokens,
                               tokens_per_s=round((trained_tokens - tokens_at_start) / max(elapsed, 1e-9), 1),
                               eta_s=round(elapsed / (step - resumed_from) * (total_steps - step), 1),
                               peak_memory_bytes=peak_rss)
            if step % spec.eval_every_steps == 0 and step < total_steps:
                self._emit_eval(model, valid_rows, pad_id, step)
            if step % spec.checkpoint_every_steps == 0 or self.stop_requested:
                self.checkpoint(model, optimizer, scheduler, step, trained_tokens)
            if self.stop_requested and step < total_steps:
                return {"preempted_at_step": step}
        valid_loss = self._emit_eval(model, valid_rows, pad_id, step)
        return self._finish(model, step, trained_tokens, valid_loss)

    def _emit_eval(self, model, rows, pad_id, step: int) -> float | None:  # type: ignore[no-untyped-def]
        valid_loss = self.evaluate(model, rows, pad_id)
        if valid_loss is not None:
            self.progress.emit("eval", step=step, valid_loss=round(valid_loss, 6))
        return valid_loss

    # -- checkpoints ----------------------------------------------------------
    def checkpoint(self, model, optimizer, scheduler, step: int, trained_tokens: int) -> Path:  # type: ignore[no-untyped-def]
        """Write `out/checkpoints/step-N` atomically (tensors and JSON, `shared.checkpoint`)."""
        final = self.out / "checkpoints" / f"step-{step}"
        final.parent.mkdir(parents=True, exist_ok=True)
        checkpoints.write_atomically(final, model=model, optimizer=optimizer, scheduler=scheduler, spec=self.spec,
                                     step=step, trained_tokens=trained_tokens, rows=self.rows)
        self.progress.emit("checkpoint", step=step, sha256=_tree_sha256(final))
        return final

    def _resume(self, model, optimizer, scheduler, total_steps: int) -> tuple[int, int]:  # type: ignore[no-untyped-def]
        """(step, trained tokens) of the checkpoint in `resume/`, checked, then loaded into the model and
        optimizer; (0, 0) without one."""
        resume = self.job_dir / "resume"
        if not os.path.lexists(resume):
            return 0, 0
        return checkpoints.load(resume, model=model, optimizer=optimizer, scheduler=scheduler, spec=self.spec,
                                total_steps=total_steps)

    def _finish(self, model, step: int, trained_tokens: int, valid_loss: float | None) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        adapter = self.out / "adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        model.save_pretrained(adapter)
        archive = self.out / "adapter.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted(adapter.iterdir()):
                tar.add(path, arcname=f"adapter/{path.name}")
        result = {"steps": step, "trained_tokens": trained_tokens, "valid_loss": valid_loss,
                  "adapter_sha256": _sha256(archive), "adapter_bytes": archive.stat().st_size}
        return result


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

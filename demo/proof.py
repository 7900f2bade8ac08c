"""The demo's last line: the downloaded adapter loads onto the base model with PEFT and lowers its loss on
the customer's data (only torch-side code here; the demo imports it after the job)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import torch

from worker.trainer import data
from worker.trainer.model import device, load_adapter, load_base, load_tokenizer
from worker.trainer.train import batch_loss, collate


def mean_loss(model, rows: list[data.PackedRow], pad_id: int) -> float:  # type: ignore[no-untyped-def]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), 8):
            loss, n = batch_loss(model, collate(rows[start:start + 8], pad_id=pad_id, device=device()))
            total, tokens = total + float(loss), tokens + n
    return total / max(tokens, 1)


def adapter_lowers_loss(model_dir: Path, archive: Path, dataset: Path, workdir: Path) -> tuple[float, float, int]:
    """(loss of the base, loss with the adapter, LoRA parameters) on the dataset's assistant tokens."""
    target = workdir / "adapter-unpacked"
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(target, filter="data")
    adapter_dir = next(p.parent for p in target.rglob("adapter_config.json"))
    tokenizer = load_tokenizer(model_dir)
    examples = data.read_examples(dataset)
    rows = data.unpacked(data.tokenize(e, tokenizer, max_seq_len=512, train_on_inputs=False) for e in examples)
    before = mean_loss(load_base(model_dir, quantization="nf4", gradient_checkpointing=False).eval(), rows,
                       tokenizer.pad_token_id)
    tuned = load_adapter(model_dir, adapter_dir).eval()
    parameters = sum(p.numel() for name, p in tuned.named_parameters() if "lora_" in name)
    after = mean_loss(tuned, rows, tokenizer.pad_token_id)
    return before, after, parameters

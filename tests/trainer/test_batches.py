"""The loss in chunks (worker/trainer/batches.py): the same token losses and the same LoRA gradients as the loss
over the whole batch's logits at once, on the tiny Llama with packed rows, whatever the chunk size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared.datasets import parse_line
from shared.jobspec import JobSpec
from tests.trainer.conftest import arithmetic_chat
from worker.trainer import data
from worker.trainer.batches import collate, token_losses
from worker.trainer.model import load_for_training, load_tokenizer


def _reference(model, batch) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Today's loss before chunking: the model's whole logits, then cross-entropy."""
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                   attention_mask=batch.attention_mask).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(),
                                             ignore_index=data.IGNORE, reduction="none").view(batch.targets.shape)


def _grads(model) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    found = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad and p.grad is not None]
    model.zero_grad(set_to_none=True)
    return found


@pytest.mark.parametrize("chunk", [7, 64, 100_000])
def test_chunked_losses_and_gradients_equal_the_whole_logits(tiny_model_dir: Path, chunk: int,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.trainer import batches  # noqa: PLC0415

    monkeypatch.setattr(batches, "ONE_PIECE_BYTES", 0)  # the tiny model's logits are small: chunk them anyway
    tokenizer = load_tokenizer(tiny_model_dir)
    examples = [parse_line(json.dumps(r).encode()) for r in arithmetic_chat(12)]
    tokenized = [data.tokenize(e, tokenizer, max_seq_len=256, train_on_inputs=False) for e in examples]
    rows = data.pack(tokenized, max_seq_len=128)
    assert len(rows) > 1
    batch = collate(rows, pad_id=tokenizer.pad_token_id, device=torch.device("cpu"))
    spec = JobSpec(job_id="x", base_model="tunegrid/tiny-llama", model_dir=str(tiny_model_dir), quantization="none",
                   lora={"r": 8, "alpha": 16, "dropout": 0.0})  # no dropout: the two passes see one function
    model = load_for_training(spec)
    torch.manual_seed(0)
    for p in model.parameters():  # LoRA B starts at zero: give the adapter something to differentiate
        if p.requires_grad:
            p.data.normal_(0, 0.02)
    model.train()
    whole = _reference(model, batch)
    whole.sum().backward()
    expected = _grads(model)
    chunked = token_losses(model, batch, chunk=chunk)
    chunked.sum().backward()
    got = _grads(model)
    assert torch.allclose(chunked, whole, rtol=1e-4, atol=1e-4)
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, rtol=1e-3, atol=1e-5), (g - e).abs().max()
    assert bool((chunked[batch.targets == data.IGNORE] == 0).all())

"""Padded batches of packed rows and the two quantities the objectives need from a forward pass: the summed token
loss (supervised), and every token's loss, which preference sums per sequence (worker/trainer/dpo.py).

The loss never holds the whole batch's logits: the model's last hidden states go through its output head a chunk of
`LOSS_CHUNK_TOKENS` tokens at a time, each chunk's logits (float32) recomputed in the backward pass instead of kept
(activation checkpointing); logits under `ONE_PIECE_BYTES` (the tiny model's, any short batch) are made at once. A
2,048-token row of a 128k-vocabulary Llama 3 costs about 1 GiB of float32 logits in
one piece; in chunks of 1,024 tokens, half that at most, and what is kept for the backward pass is the hidden
states, not the logits (bench/chunked_loss.py measures it; tests/trainer/test_batches.py shows the loss and the
gradients equal the one-piece computation's)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from shared.memory import LOSS_CHUNK_TOKENS, ONE_PIECE_BYTES  # one definition: the estimator counts them too
from worker.trainer import data


@dataclass
class Batch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor  # next-token labels, IGNORE across example boundaries and padding
    attention_mask: torch.Tensor  # (B, 1, L, L) bool: True where a token may attend
    tokens: int

    @property
    def labelled(self) -> int:
        return int((self.targets != data.IGNORE).sum())


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




def _causal_lm(model):  # type: ignore[no-untyped-def]
    """The Hugging Face causal LM under a PEFT wrapper (its `model` is the decoder, its `lm_head` the output)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _chunk_losses(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:  # Gemma 2 caps its final logits, as its own forward does
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=data.IGNORE, reduction="none")


def token_losses(model, batch: Batch, *, chunk: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """(B, L) negative log-likelihood of each target, 0 where there is none; the logits made `chunk` tokens at a
    time and recomputed for the backward pass, never all at once."""
    lm = _causal_lm(model)
    hidden = lm.model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                      attention_mask=batch.attention_mask).last_hidden_state
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    return losses_from_hidden(hidden, batch.targets, lm.lm_head, softcap=softcap, chunk=chunk)


def losses_from_hidden(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, *,
                       softcap: float | None = None, chunk: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """Token losses of the last hidden states (B, L, H) against `targets` (B, L), through `head` in chunks."""
    flat, flat_targets = hidden.flatten(0, 1), targets.flatten()
    vocab = getattr(head, "out_features", 0) or head.weight.shape[0]
    if flat.shape[0] * vocab * 4 <= ONE_PIECE_BYTES:  # small logits: one piece, nothing recomputed
        return _chunk_losses(flat, flat_targets, head, softcap).view(targets.shape)
    pieces = []
    for start in range(0, flat.shape[0], chunk):
        h, t = flat[start:start + chunk], flat_targets[start:start + chunk]
        if not bool((t != data.IGNORE).any()):  # nothing to learn here: no logits at all
            pieces.append(torch.zeros(t.shape, dtype=torch.float32, device=t.device))
        elif torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_losses, h, t, head, softcap, use_reentrant=False))
        else:
            pieces.append(_chunk_losses(h, t, head, softcap))
    return torch.cat(pieces).view(targets.shape)


def batch_loss(model, batch: Batch) -> tuple[torch.Tensor, int]:  # type: ignore[no-untyped-def]
    """Sum of token losses and how many tokens carry loss."""
    return token_losses(model, batch).sum(), batch.labelled


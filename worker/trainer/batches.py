"""Batches of packed rows (dense or flat, worker/trainer/attention.py) and the two quantities the objectives need from a forward pass: the summed token
loss (supervised), and every token's loss, which preference sums per sequence (worker/trainer/dpo.py).

The loss never holds the whole batch's logits: the model's last hidden states go through its output head a chunk of
`shared.memory.loss_chunk_tokens` tokens at a time (at most 1,024, and at most `ONE_PIECE_BYTES` of float32 logits),
each chunk's logits recomputed in the backward pass instead of kept (activation checkpointing); logits under
`ONE_PIECE_BYTES` (the tiny model's, any short batch) are made at once. A 2,048-token row of a 128k-vocabulary
Llama 3 costs about 1 GiB of float32 logits in one piece; in chunks of 523 tokens, a quarter of that, and what is
kept for the backward pass is the hidden states, not the logits (bench/chunked_loss.py measures it; tests/trainer/test_batches.py shows the loss and the
gradients equal the one-piece computation's)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from shared.memory import ONE_PIECE_BYTES, loss_chunk_tokens  # one definition: the estimator counts them too
from worker.trainer import attention, data


@dataclass
class Batch:
    """Rows of packed examples in one of two layouts (worker/trainer/attention.py): dense, (B, L) padded to the
    longest row with a (B, 1, L, L) mask; or flat, (1, T) every token once and the examples' boundaries."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor  # next-token labels, IGNORE across example boundaries and padding
    tokens: int
    attention_mask: torch.Tensor | None = None  # dense: (B, 1, L, L) bool, True where a token may attend
    cu_seq_lens: torch.Tensor | None = None  # flat: (N + 1,) int32 offsets of the N examples
    max_length: int = 0  # flat: the longest example

    @property
    def labelled(self) -> int:
        return int((self.targets != data.IGNORE).sum())

    @property
    def flat(self) -> bool:
        return self.cu_seq_lens is not None

    def model_inputs(self) -> dict[str, Any]:
        """What the decoder's forward pass takes for this layout. A flat batch's position ids restart at every
        example, so a model on stock SDPA (which detects packing from them) attends the same way, only slower."""
        inputs: dict[str, Any] = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if self.flat:
            return {**inputs, "cu_seq_lens_q": self.cu_seq_lens, "cu_seq_lens_k": self.cu_seq_lens,
                    "max_length_q": self.max_length, "max_length_k": self.max_length}
        return {**inputs, "attention_mask": self.attention_mask}

    def per_token(self, rows: list[list[int]], *, fill: int) -> torch.Tensor:
        """Per-row values laid out as this batch lays out the rows' tokens (`fill` where there is no token)."""
        if self.flat:
            return torch.tensor([v for row in rows for v in row], dtype=torch.long)[None]
        out = torch.full(tuple(self.targets.shape), fill, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out


def _targets(row: data.PackedRow) -> torch.Tensor:
    """Each token's next token where both belong to the same example; IGNORE elsewhere."""
    labels, segments = torch.tensor(row.labels), torch.tensor(row.segment_ids)
    targets = torch.full((len(row),), data.IGNORE, dtype=torch.long)
    same_example = segments[1:] == segments[:-1]
    targets[:-1] = torch.where(same_example, labels[1:], data.IGNORE)
    return targets


def collate(rows: list[data.PackedRow], *, pad_id: int, device: torch.device, flat: bool | None = None) -> Batch:
    """The rows as one batch on `device`, flat where that device attends flat (attention.flat_layout)."""
    if flat if flat is not None else attention.flat_layout(device):
        return _collate_flat(rows, device)
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
        targets[i, :n] = _targets(row)
    causal = torch.ones((length, length), dtype=torch.bool).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal & (segments[:, None, :] > 0)
    allowed |= torch.eye(length, dtype=torch.bool)  # padding rows attend to themselves (no NaN)
    return Batch(ids.to(device), positions.to(device), targets.to(device), tokens=int((segments > 0).sum()),
                 attention_mask=allowed[:, None].to(device))


def _collate_flat(rows: list[data.PackedRow], device: torch.device) -> Batch:
    lengths = [n for row in rows for n in row.example_lengths()]
    cu_seq_lens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seq_lens[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    ids = torch.tensor([t for row in rows for t in row.input_ids], dtype=torch.long)[None]
    positions = torch.tensor([p for row in rows for p in row.position_ids], dtype=torch.long)[None]
    targets = torch.cat([_targets(row) for row in rows])[None]
    return Batch(ids.to(device), positions.to(device), targets.to(device), tokens=ids.shape[1],
                 cu_seq_lens=cu_seq_lens.to(device), max_length=max(lengths))


def _causal_lm(model):  # type: ignore[no-untyped-def]
    """The Hugging Face causal LM under a PEFT wrapper (its `model` is the decoder, its `lm_head` the output)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _chunk_losses(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:  # Gemma 2 caps its final logits, as its own forward does
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=data.IGNORE, reduction="none")


def token_losses(model, batch: Batch, *, chunk: int | None = None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """(B, L) negative log-likelihood of each target, 0 where there is none; the logits made `chunk` tokens at a
    time and recomputed for the backward pass, never all at once."""
    lm = _causal_lm(model)
    hidden = lm.model(**batch.model_inputs()).last_hidden_state
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    return losses_from_hidden(hidden, batch.targets, lm.lm_head, softcap=softcap, chunk=chunk)


def losses_from_hidden(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, *,
                       softcap: float | None = None, chunk: int | None = None) -> torch.Tensor:
    """Token losses of the last hidden states (B, L, H) against `targets` (B, L), through `head` in chunks."""
    flat, flat_targets = hidden.flatten(0, 1), targets.flatten()
    vocab = getattr(head, "out_features", 0) or head.weight.shape[0]
    if flat.shape[0] * vocab * 4 <= ONE_PIECE_BYTES:  # small logits: one piece, nothing recomputed
        return _chunk_losses(flat, flat_targets, head, softcap).view(targets.shape)
    chunk = chunk or loss_chunk_tokens(vocab)
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


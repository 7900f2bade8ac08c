"""Padded batches of packed rows and the two quantities the objectives need from a forward pass: the summed token
loss (supervised), and every token's loss, which preference sums per sequence (worker/trainer/dpo.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def token_losses(model, batch: Batch) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """(B, L) negative log-likelihood of each target, 0 where there is none."""
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                   attention_mask=batch.attention_mask).logits
    losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(),
                                               ignore_index=data.IGNORE, reduction="none")
    return losses.view(batch.targets.shape)


def batch_loss(model, batch: Batch) -> tuple[torch.Tensor, int]:  # type: ignore[no-untyped-def]
    """Sum of token losses and how many tokens carry loss."""
    return token_losses(model, batch).sum(), batch.labelled


"""Direct Preference Optimization (Rafailov et al., 2023) on the 4-bit base with LoRA, computed here.

Each preference pair is two sequences, the input with the preferred and with the non-preferred answer; a
sequence's log-probability counts its answer tokens only. The reference policy is the same model with the
adapter as it was before the first step: disabled for a fresh LoRA (whose B matrices start at zero, so the
two are the same function), or the adapter the job continues from (SFT, then DPO). Its log-probabilities are
computed once, before training, in evaluation mode and without gradients, so no second copy of the model is
ever held and each step runs one forward and backward pass over both answers.

    loss = -log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))))

The rewards are beta * (log pi - log ref) of each answer; the margin is their difference, the accuracy the
share of pairs whose preferred answer has the larger reward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.trainer import data
from worker.trainer.batches import collate, token_losses


@dataclass(slots=True)
class Pair:
    chosen: data.Tokenized
    rejected: data.Tokenized
    reference_chosen: float = 0.0
    reference_rejected: float = 0.0

    @property
    def tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


@dataclass(frozen=True, slots=True)
class PreferenceFigures:
    loss: torch.Tensor  # summed over the pairs (the caller divides)
    chosen_reward: float  # summed
    rejected_reward: float
    correct: int  # pairs whose preferred answer has the larger reward
    pairs: int
    tokens: int


def _packed(sequences: list[data.Tokenized], max_len: int | None) -> tuple[list[data.PackedRow], list[list[int]]]:
    """The sequences packed first-fit into rows of at most `max_len` tokens (one a row without it), and for every
    token of each row the index of the sequence it belongs to."""
    rows: list[data.PackedRow] = []
    owners: list[list[int]] = []
    for index, sequence in enumerate(sequences):
        size = len(sequence.input_ids)
        target = next((i for i, row in enumerate(rows) if max_len is not None and len(row) + size <= max_len), None)
        if target is None:
            rows.append(data.PackedRow())
            owners.append([])
            target = len(rows) - 1
        rows[target].add(sequence)
        owners[target] += [index] * size
    return rows, owners


def pair_logps(model, pairs: list[Pair], *, pad_id: int, device: torch.device,  # type: ignore[no-untyped-def]
               max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Log-probabilities of the preferred and the non-preferred answers, in one forward pass; with `max_len`, the
    sequences are packed into rows of that many tokens (each attends only to itself, as in supervised rows)."""
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    rows, owners = _packed(sequences, max_len)
    batch = collate(rows, pad_id=pad_id, device=device)
    owner = batch.per_token(owners, fill=len(sequences))  # padding: a sequence of its own, dropped
    losses = token_losses(model, batch)
    sums = torch.zeros(len(sequences) + 1, dtype=losses.dtype, device=losses.device)
    sums = sums.index_add(0, owner.to(losses.device).flatten(), losses.flatten())
    logps = -sums[: len(sequences)]
    return logps[: len(pairs)], logps[len(pairs):], batch.tokens


def set_reference(model, pairs: list[Pair], *, batch_size: int, pad_id: int, device: torch.device,  # type: ignore[no-untyped-def]
                  adapter_is_reference: bool, max_len: int | None = None) -> None:
    """Fill each pair's reference log-probabilities from the model as it is now (see the module's docstring)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            if adapter_is_reference:
                chosen, rejected, _ = pair_logps(model, chunk, pad_id=pad_id, device=device, max_len=max_len)
            else:
                with model.disable_adapter():
                    chosen, rejected, _ = pair_logps(model, chunk, pad_id=pad_id, device=device, max_len=max_len)
            for pair, c, r in zip(chunk, chosen.tolist(), rejected.tolist(), strict=True):
                pair.reference_chosen, pair.reference_rejected = c, r
    model.train(was_training)


def figures(model, pairs: list[Pair], *, beta: float, pad_id: int, device: torch.device,  # type: ignore[no-untyped-def]
            max_len: int | None = None) -> PreferenceFigures:
    chosen, rejected, tokens = pair_logps(model, pairs, pad_id=pad_id, device=device, max_len=max_len)
    reference_chosen = torch.tensor([p.reference_chosen for p in pairs], device=chosen.device)
    reference_rejected = torch.tensor([p.reference_rejected for p in pairs], device=chosen.device)
    chosen_reward = beta * (chosen - reference_chosen)
    rejected_reward = beta * (rejected - reference_rejected)
    margin = chosen_reward - rejected_reward
    return PreferenceFigures(
        loss=-F.logsigmoid(margin).sum(), chosen_reward=float(chosen_reward.detach().sum()),
        rejected_reward=float(rejected_reward.detach().sum()), correct=int((margin.detach() > 0).sum()),
        pairs=len(pairs), tokens=tokens,
    )


def metrics(parts: list[PreferenceFigures], prefix: str = "") -> dict[str, float]:
    """Mean loss, rewards, margin and accuracy over the pairs of `parts`, named as the events carry them."""
    pairs = max(sum(p.pairs for p in parts), 1)
    chosen = sum(p.chosen_reward for p in parts) / pairs
    rejected = sum(p.rejected_reward for p in parts) / pairs
    return {f"{prefix}loss": round(sum(float(p.loss.detach()) for p in parts) / pairs, 6),
            f"{prefix}chosen_reward": round(chosen, 6), f"{prefix}rejected_reward": round(rejected, 6),
            f"{prefix}reward_margin": round(chosen - rejected, 6),
            f"{prefix}reward_accuracy": round(sum(p.correct for p in parts) / pairs, 6)}


def evaluate(model, pairs: list[Pair], *, beta: float, batch_size: int, pad_id: int, device: torch.device,  # type: ignore[no-untyped-def]
             prefix: str = "valid_", max_len: int | None = None) -> dict[str, float] | None:
    """`metrics` of `pairs` under the model as it is, in evaluation mode and without gradients."""
    if not pairs:
        return None
    was_training = model.training
    model.eval()
    with torch.no_grad():
        parts = [figures(model, pairs[s:s + batch_size], beta=beta, pad_id=pad_id, device=device, max_len=max_len)
                 for s in range(0, len(pairs), batch_size)]
    model.train(was_training)
    return metrics(parts, prefix=prefix)


def answer_tokens(pairs: list[Pair]) -> int:
    """Tokens that carry loss in both answers of every pair (what a verifier's figures are measured on)."""
    return sum(sum(1 for label in side.labels[1:] if label != data.IGNORE)
               for p in pairs for side in (p.chosen, p.rejected))

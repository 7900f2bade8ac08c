"""How much GPU memory QLoRA fine-tuning of a catalog model needs: placement asks it whether a job fits a card.

An estimate from the architecture, term by term (bytes):
- base weights in 4-bit NF4 with double-quantized constants (4.127 bits a parameter, QLoRA paper §3);
  embeddings and the LM head stay in 16-bit, as bitsandbytes leaves them;
- LoRA weights, their gradients and AdamW's two moments, all fp32 (16 bytes a LoRA parameter);
- activations: with gradient checkpointing, each layer's input is kept and one layer at a time is
  recomputed; without it, every layer's activations are kept;
- logits in fp32 and their gradient;
- the CUDA context and allocator slack.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.catalog import BaseModelSpec
from shared.lora import lora_parameter_count

GIB = 1024**3
NF4_BITS_PER_PARAM = 4.127  # 4-bit weights + double-quantized absmax constants (blocks of 64, then 256)
LORA_BYTES_PER_PARAM = 16  # fp32 weight + fp32 gradient + AdamW m and v
ACTIVATION_BYTES = 2  # bf16
CUDA_CONTEXT_BYTES = int(0.75 * GIB)
ALLOCATOR_SLACK = 1.10
# Activations one decoder layer keeps for backward, in units of (tokens x width): attention inputs,
# q/k/v/o, norms and residuals scale with hidden size; the MLP's gate/up/act/down with its width.
ACTIVATIONS_PER_HIDDEN = 16
ACTIVATIONS_PER_INTERMEDIATE = 4


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    weights: int
    lora: int
    activations: int
    logits: int
    overhead: int

    @property
    def total(self) -> int:
        return int((self.weights + self.lora + self.activations + self.logits + self.overhead) * ALLOCATOR_SLACK)

    @property
    def total_gib(self) -> float:
        return self.total / GIB


def lora_parameters(model: BaseModelSpec, *, r: int, target_modules: str | list[str] = "all-linear") -> int:
    return lora_parameter_count(model, r=r, target_modules=target_modules)


# The trainer's loss (worker/trainer/batches.py) makes float32 logits at most this many tokens at a time, once they
# would take more than `ONE_PIECE_BYTES` in one piece.
LOSS_CHUNK_TOKENS = 1024
ONE_PIECE_BYTES = 256 * 1024**2


def loss_tokens(tokens: int, vocab_size: int) -> int:
    """How many tokens' logits the loss holds at once."""
    return tokens if tokens * vocab_size * 4 <= ONE_PIECE_BYTES else min(tokens, LOSS_CHUNK_TOKENS)


def estimate_qlora(
    model: BaseModelSpec, *, seq_len: int, batch_size: int = 1, lora_r: int = 16,
    target_modules: str | list[str] = "all-linear", gradient_checkpointing: bool = True,
) -> MemoryEstimate:
    embedding_params = 2 * model.vocab_size * model.hidden_size  # input embeddings and LM head, 16-bit
    quantized_params = max(model.parameters - embedding_params, 0)
    weights = int(quantized_params * NF4_BITS_PER_PARAM / 8) + embedding_params * 2
    lora = lora_parameters(model, r=lora_r, target_modules=target_modules) * LORA_BYTES_PER_PARAM
    tokens = seq_len * batch_size
    per_layer = tokens * (model.hidden_size * ACTIVATIONS_PER_HIDDEN
                          + model.intermediate_size * ACTIVATIONS_PER_INTERMEDIATE) * ACTIVATION_BYTES
    if gradient_checkpointing:
        activations = model.layers * tokens * model.hidden_size * ACTIVATION_BYTES + per_layer
    else:
        activations = model.layers * per_layer
    logits = 2 * loss_tokens(tokens, model.vocab_size) * model.vocab_size * 4  # float32 logits and their gradient
    return MemoryEstimate(weights=weights, lora=lora, activations=activations, logits=logits,
                          overhead=CUDA_CONTEXT_BYTES)


def fits(model: BaseModelSpec, *, vram_bytes: int, seq_len: int, batch_size: int = 1, lora_r: int = 16) -> bool:
    return estimate_qlora(model, seq_len=seq_len, batch_size=batch_size, lora_r=lora_r).total <= vram_bytes


def estimate_evaluation(
    model: BaseModelSpec, *, seq_len: int, batch_size: int = 1, lora_r: int = 16,
    target_modules: str | list[str] = "all-linear",
) -> MemoryEstimate:
    """Forward passes only (a verification lease: the base and an adapter evaluated, nothing trained): the same
    weights, LoRA weights without gradients or optimizer state (fp32), one layer's activations at a time, and
    one copy of the logits."""
    train = estimate_qlora(model, seq_len=seq_len, batch_size=batch_size, lora_r=lora_r, target_modules=target_modules)
    tokens = seq_len * batch_size
    per_layer = tokens * (model.hidden_size * ACTIVATIONS_PER_HIDDEN
                          + model.intermediate_size * ACTIVATIONS_PER_INTERMEDIATE) * ACTIVATION_BYTES
    return MemoryEstimate(weights=train.weights, lora=train.lora // (LORA_BYTES_PER_PARAM // 4), activations=per_layer,
                          logits=tokens * model.vocab_size * 4, overhead=CUDA_CONTEXT_BYTES)


EXPORT_SHARD_BYTES = 1024**3  # what the merge holds before writing a file (worker/trainer/merge.py SHARD_BYTES)


def estimate_export(model: BaseModelSpec, *, lora_r: int = 16, target_modules: str | list[str] = "all-linear") -> MemoryEstimate:
    """An export lease (worker/trainer/merge.py, gguf_export.py): the base streams through a tensor at a time, so
    the peak is the largest tensor (the embedding, or an MLP projection) in float32 with its converted copy, the
    merged model's file being filled (at most a shard), and the LoRA weights in float32; never the whole model
    (measured on a Qwen 2.5 0.5B shape, bench/export.py: 2.4 GB resident merging 942 MB of weights, 1.4 GB writing
    GGUF, the mapped pages of the base's file included)."""
    largest = max(model.vocab_size, model.intermediate_size) * model.hidden_size * 4
    return MemoryEstimate(weights=EXPORT_SHARD_BYTES + 2 * largest,
                          lora=lora_parameters(model, r=lora_r, target_modules=target_modules) * 4,
                          activations=0, logits=0, overhead=CUDA_CONTEXT_BYTES)

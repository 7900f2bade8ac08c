"""How much GPU memory QLoRA fine-tuning of a catalog model needs: placement asks it whether a job fits a card.

An estimate from the architecture and the trainer's own layout (worker/trainer/), term by term (bytes):
- base weights in 4-bit NF4 with double-quantized constants (4.127 bits a parameter, QLoRA paper §3);
  embeddings and the LM head stay in 16-bit (the trainer never casts them to float32, worker/trainer/model.py),
  once when tied; plus the 16-bit copy bitsandbytes dequantizes the largest matrix into for a product;
- LoRA weights, their gradients and AdamW's two moments, all fp32 (16 bytes a LoRA parameter);
- activations of a micro-batch's tokens (rows x max_seq_len at most: flat batches carry no padding, and the
  varlen kernel no (L x L) mask or score matrix, so nothing here grows with the square of a length): with
  gradient checkpointing, each layer's 16-bit input is kept and one layer at a time is recomputed; without it,
  every layer's activations are kept;
- the loss's logits: one piece of at most `ONE_PIECE_BYTES` of float32 logits at a time (worker/trainer/batches.py),
  `LOGIT_BYTES` for each logit at the backward pass's peak;
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


# The trainer's loss (worker/trainer/batches.py) makes a batch's float32 logits in one piece when they take at most
# `ONE_PIECE_BYTES`; else in chunks of `loss_chunk_tokens` tokens, at most that many bytes each.
LOSS_CHUNK_TOKENS = 1024
ONE_PIECE_BYTES = 256 * 1024**2
# A logit's bytes at the loss's peak (its backward pass): the float32 log-probabilities kept, their gradient, the
# gradient of the logits, and the 16-bit head output's gradient beside them. Measured on the CPU with a float32
# head (bench/chunked_loss.py): 15.8 bytes a logit in one piece, 12.3 in chunks.
LOGIT_BYTES = 16
# Families whose attention caps its logits (Gemma 2), which no fast kernel does: their eager attention holds an
# example's (n x n) scores for every head, about 12 bytes a score kept and in flight (the tanh of the capped scores,
# float32 probabilities, their 16-bit copy; measured on the CPU at Gemma 2 2B's layer shape). A layer's examples
# together hold at most heads x max_seq_len x tokens of them (each n <= max_seq_len).
SOFT_CAPPED_ATTENTION = frozenset({"gemma2"})
CAPPED_SCORE_BYTES = 12
# What `batch_size: "auto"` puts in a micro-batch: this many tokens of rows (a preference pair's two sequences count
# twice), between 1 and 8 rows.
AUTO_BATCH_TOKENS = 4096


def micro_batch(batch_size: int | str, *, max_seq_len: int, sequences: int = 1) -> int:
    """Training units (packed rows, or preference pairs of `sequences` = 2) in one forward pass: the job's
    `batch_size`, or what "auto" makes of it. The trainer batches so and placement sizes memory so."""
    if batch_size != "auto":
        return int(batch_size)
    return max(1, min(8, AUTO_BATCH_TOKENS // (max_seq_len * sequences)))


def loss_chunk_tokens(vocab_size: int) -> int:
    """Tokens a chunk of the loss holds: at most `LOSS_CHUNK_TOKENS`, and no more than `ONE_PIECE_BYTES` of float32
    logits (523 tokens for Llama 3's 128k vocabulary)."""
    return max(64, min(LOSS_CHUNK_TOKENS, ONE_PIECE_BYTES // (vocab_size * 4)))


def loss_tokens(tokens: int, vocab_size: int) -> int:
    """How many tokens' logits the loss holds at once."""
    return tokens if tokens * vocab_size * 4 <= ONE_PIECE_BYTES else min(tokens, loss_chunk_tokens(vocab_size))


def estimate_qlora(
    model: BaseModelSpec, *, seq_len: int, batch_size: int = 1, lora_r: int = 16,
    target_modules: str | list[str] = "all-linear", gradient_checkpointing: bool = True,
) -> MemoryEstimate:
    embedding_params = (1 if model.tied_embeddings else 2) * model.vocab_size * model.hidden_size  # 16-bit
    quantized_params = max(model.parameters - embedding_params, 0)
    dequantized = model.intermediate_size * model.hidden_size * 2  # the largest matrix, 16-bit, for one product
    weights = int(quantized_params * NF4_BITS_PER_PARAM / 8) + embedding_params * 2 + dequantized
    lora = lora_parameters(model, r=lora_r, target_modules=target_modules) * LORA_BYTES_PER_PARAM
    tokens = seq_len * batch_size
    per_layer = tokens * (model.hidden_size * ACTIVATIONS_PER_HIDDEN
                          + model.intermediate_size * ACTIVATIONS_PER_INTERMEDIATE) * ACTIVATION_BYTES
    per_layer += _capped_scores(model, seq_len=seq_len, tokens=tokens)
    if gradient_checkpointing:
        activations = model.layers * tokens * model.hidden_size * ACTIVATION_BYTES + per_layer
    else:
        activations = model.layers * per_layer
    logits = loss_tokens(tokens, model.vocab_size) * model.vocab_size * LOGIT_BYTES
    return MemoryEstimate(weights=weights, lora=lora, activations=activations, logits=logits,
                          overhead=CUDA_CONTEXT_BYTES)


def _capped_scores(model: BaseModelSpec, *, seq_len: int, tokens: int) -> int:
    """A layer's attention scores, where the family caps them (see `SOFT_CAPPED_ATTENTION`); 0 elsewhere (the
    varlen kernel holds none)."""
    if model.architecture not in SOFT_CAPPED_ATTENTION:
        return 0
    return model.attention_heads * min(seq_len, tokens) * tokens * CAPPED_SCORE_BYTES


def fits(model: BaseModelSpec, *, vram_bytes: int, seq_len: int, batch_size: int = 1, lora_r: int = 16) -> bool:
    return estimate_qlora(model, seq_len=seq_len, batch_size=batch_size, lora_r=lora_r).total <= vram_bytes


def estimate_evaluation(
    model: BaseModelSpec, *, seq_len: int, batch_size: int = 1, lora_r: int = 16,
    target_modules: str | list[str] = "all-linear",
) -> MemoryEstimate:
    """Forward passes only (a verification lease: the base and an adapter evaluated, nothing trained): the same
    weights, LoRA weights without gradients or optimizer state (fp32), one layer's activations at a time, and
    the loss's logits a piece at a time, as in training."""
    train = estimate_qlora(model, seq_len=seq_len, batch_size=batch_size, lora_r=lora_r, target_modules=target_modules)
    tokens = seq_len * batch_size
    per_layer = tokens * (model.hidden_size * ACTIVATIONS_PER_HIDDEN
                          + model.intermediate_size * ACTIVATIONS_PER_INTERMEDIATE) * ACTIVATION_BYTES
    per_layer += _capped_scores(model, seq_len=seq_len, tokens=seq_len)  # one example's at a time, nothing kept
    return MemoryEstimate(weights=train.weights, lora=train.lora // (LORA_BYTES_PER_PARAM // 4), activations=per_layer,
                          logits=loss_tokens(tokens, model.vocab_size) * model.vocab_size * LOGIT_BYTES,
                          overhead=CUDA_CONTEXT_BYTES)


# The batch program (worker/trainer/generate.py) generates at most this many prompts together on a GPU, and no more
# than `GENERATION_TOKENS` tokens of them (each prompt padded to the group's longest, plus the answer it may grow).
GENERATION_SEQUENCES = 32
GENERATION_TOKENS = 16384
# What one layer of a forward pass holds in flight, in units of (tokens x width), nothing kept for a backward pass.
INFERENCE_PER_HIDDEN = 4
INFERENCE_PER_INTERMEDIATE = 3


def estimate_generation(model: BaseModelSpec, *, lora_r: int = 16,
                        target_modules: str | list[str] = "all-linear") -> MemoryEstimate:
    """A batch lease (worker/trainer/generate.py): the weights and an adapter's (float32, no gradients); the KV cache
    of `GENERATION_TOKENS` tokens (16-bit keys and values of every layer); the prompts' forward pass, a layer at a
    time over those tokens; the logits of each sequence's next token. Llama 3.1 8B: about 11 GiB."""
    train = estimate_qlora(model, seq_len=1, lora_r=lora_r, target_modules=target_modules)
    head_dim = model.hidden_size // model.attention_heads
    kv_cache = 2 * model.layers * model.kv_heads * head_dim * GENERATION_TOKENS * ACTIVATION_BYTES
    prefill = GENERATION_TOKENS * (model.hidden_size * INFERENCE_PER_HIDDEN
                                   + model.intermediate_size * INFERENCE_PER_INTERMEDIATE) * ACTIVATION_BYTES
    return MemoryEstimate(weights=train.weights, lora=train.lora // (LORA_BYTES_PER_PARAM // 4),
                          activations=kv_cache + prefill, logits=GENERATION_SEQUENCES * model.vocab_size * LOGIT_BYTES,
                          overhead=CUDA_CONTEXT_BYTES)


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

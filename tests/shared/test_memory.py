"""The QLoRA memory estimator against published figures (QLoRA paper, Dettmers et al. 2023) and common sense."""

from __future__ import annotations

from dataclasses import replace

import pytest

from shared.catalog import get_base_model
from shared.memory import GIB, estimate_qlora, fits, lora_parameters

# LLaMA-65B's architecture (the paper's largest model): not in our catalog, built from its config.
LLAMA_65B = replace(get_base_model("llama-3.1-8b-instruct"), id="llama-65b", hf_repo=None, parameters=65_285_660_672,
                    layers=80, hidden_size=8192, intermediate_size=22016, attention_heads=64, kv_heads=64,
                    vocab_size=32000, max_seq_len=2048)


@pytest.mark.parametrize("model_id,card_gib", [
    ("mistral-7b-instruct-v0.3", 12), ("qwen2.5-7b-instruct", 12),
    ("llama-3.1-8b-instruct", 16),  # 128k vocabulary: its logits alone take about 2 GiB at 2048 tokens
])
def test_7b_class_fits_a_12_to_16_gb_card_at_batch_1_seq_2048(model_id: str, card_gib: int) -> None:
    estimate = estimate_qlora(get_base_model(model_id), seq_len=2048, batch_size=1, lora_r=16)
    assert 5 < estimate.total_gib <= card_gib, estimate
    assert fits(get_base_model(model_id), vram_bytes=card_gib * GIB, seq_len=2048)
    assert not fits(get_base_model(model_id), vram_bytes=4 * GIB, seq_len=2048)


def test_65b_fits_48_gb_as_in_the_qlora_paper() -> None:
    estimate = estimate_qlora(LLAMA_65B, seq_len=2048, batch_size=1, lora_r=16)
    assert 35 < estimate.total_gib <= 48, estimate
    assert not fits(LLAMA_65B, vram_bytes=24 * GIB, seq_len=2048)


def test_4bit_weights_cost_about_half_a_byte_a_parameter() -> None:
    estimate = estimate_qlora(LLAMA_65B, seq_len=1)
    assert 0.5 < estimate.weights / LLAMA_65B.parameters < 0.56


def test_memory_grows_with_sequence_batch_and_rank_and_checkpointing_saves_it() -> None:
    model = get_base_model("qwen2.5-1.5b-instruct")
    base = estimate_qlora(model, seq_len=1024).total
    assert estimate_qlora(model, seq_len=4096).total > base
    assert estimate_qlora(model, seq_len=1024, batch_size=4).total > base
    assert estimate_qlora(model, seq_len=1024, lora_r=64).total > base
    assert estimate_qlora(model, seq_len=4096, gradient_checkpointing=False).total > \
        estimate_qlora(model, seq_len=4096).total


def test_lora_parameter_count_matches_peft_for_the_tiny_model() -> None:
    # 34,816: the LoRA gradients tests/trainer/test_gradients_after_eval.py collects from peft for r=8 on all
    # linear layers (2 layers: 4 attention projections 128->128, 3 MLP projections between 128 and 256).
    assert lora_parameters(get_base_model("tunegrid/tiny-llama"), r=8) == 2 * 8 * (4 * 256 + 3 * 384)


def test_an_export_needs_a_few_gigabytes_whatever_the_models_size() -> None:
    """The merge streams the base a tensor at a time: an 8B model's export fits a 16 GB gaming PC's memory, and
    the estimate is far under the model's own 16-bit size."""
    from shared.memory import estimate_export  # noqa: PLC0415

    llama = get_base_model("llama-3.1-8b-instruct")
    estimate = estimate_export(llama)
    assert 3 * GIB < estimate.total < 8 * GIB < 2 * llama.parameters
    small = estimate_export(get_base_model("qwen2.5-0.5b-instruct"))
    assert small.total < estimate.total
    assert small.total > 2.4e9  # measured there: 2.4 GB resident merging it (bench/export.py)


def test_the_chunked_loss_bounds_the_logits_whatever_the_length() -> None:
    """The trainer's loss holds one chunk's logits (worker/trainer/batches.py), at most `ONE_PIECE_BYTES` of float32
    logits: past that, a longer row adds no logits memory; a small vocabulary's logits stay in one piece."""
    from shared.memory import LOGIT_BYTES, ONE_PIECE_BYTES, loss_chunk_tokens  # noqa: PLC0415

    llama = get_base_model("llama-3.1-8b-instruct")
    at_2k, at_8k = (estimate_qlora(llama, seq_len=n) for n in (2048, 8192))
    assert loss_chunk_tokens(llama.vocab_size) == 523
    assert at_2k.logits == at_8k.logits == 523 * llama.vocab_size * LOGIT_BYTES  # about 1 GiB at the peak
    assert 523 * llama.vocab_size * 4 <= ONE_PIECE_BYTES
    assert loss_chunk_tokens(32768) == 1024  # Mistral's: the token bound, not the bytes
    tiny = get_base_model("tunegrid/tiny-llama")
    assert estimate_qlora(tiny, seq_len=512).logits == 512 * tiny.vocab_size * LOGIT_BYTES


def test_nothing_grows_with_the_square_of_a_length() -> None:
    """Flat batches through the varlen kernel hold no (L x L) mask or scores: 8,192 tokens cost the same as a row
    or as four rows of 2,048."""
    llama = get_base_model("llama-3.1-8b-instruct")
    assert estimate_qlora(llama, seq_len=8192).total == estimate_qlora(llama, seq_len=2048, batch_size=4).total


def test_tied_embeddings_are_held_once() -> None:
    qwen = get_base_model("qwen2.5-1.5b-instruct")
    assert qwen.tied_embeddings
    untied = replace(qwen, tied_embeddings=False)
    embedding_bytes = qwen.vocab_size * qwen.hidden_size * 2
    # Untied, the head's parameters are counted in 16-bit instead of 4-bit: the difference is the head less its
    # quantized size.
    difference = estimate_qlora(untied, seq_len=1024).weights - estimate_qlora(qwen, seq_len=1024).weights
    assert difference == pytest.approx(embedding_bytes - qwen.vocab_size * qwen.hidden_size * 4.127 / 8, rel=1e-6)


def test_auto_micro_batches_hold_the_same_tokens_for_the_trainer_and_placement() -> None:
    from shared.memory import AUTO_BATCH_TOKENS, micro_batch  # noqa: PLC0415

    assert micro_batch(3, max_seq_len=2048) == 3
    assert micro_batch("auto", max_seq_len=2048) == AUTO_BATCH_TOKENS // 2048 == 2
    assert micro_batch("auto", max_seq_len=2048, sequences=2) == 1  # a pair: two sequences
    assert micro_batch("auto", max_seq_len=256) == 8 and micro_batch("auto", max_seq_len=32768) == 1


def test_soft_capped_attention_counts_its_scores() -> None:
    """Gemma 2's capped attention runs eagerly, one example at a time (worker/trainer/attention.py): a layer's
    scores, heads x max_seq_len x tokens at most, are counted; families on the varlen kernel hold none."""
    from shared.memory import CAPPED_SCORE_BYTES  # noqa: PLC0415

    gemma = get_base_model("gemma-2-2b-it")
    uncapped = replace(gemma, architecture="llama")
    for batch in (1, 2, 8):
        difference = estimate_qlora(gemma, seq_len=2048, batch_size=batch).activations - \
            estimate_qlora(uncapped, seq_len=2048, batch_size=batch).activations
        assert difference == gemma.attention_heads * 2048 * 2048 * batch * CAPPED_SCORE_BYTES
    # At batch 8 the scores alone take 3 GiB: the estimate no longer lets a 12 GB card take it.
    assert not fits(gemma, vram_bytes=12 * GIB, seq_len=2048, batch_size=8)


def test_a_batch_lease_is_sized_by_its_generation_groups_not_a_training_batch() -> None:
    """The batch program generates at most GENERATION_TOKENS tokens at once: their KV cache (every layer's 16-bit
    keys and values) and one layer's forward pass over them; an 8B Llama then fits a 12 GB card, and a model with
    more key-value heads (Phi-3 mini, 32) holds a larger cache than one with grouped queries (Llama 3, 8)."""
    from shared.memory import GENERATION_TOKENS, estimate_generation  # noqa: PLC0415

    llama, phi = get_base_model("llama-3.1-8b-instruct"), get_base_model("phi-3-mini-4k-instruct")
    kv = 2 * llama.layers * llama.kv_heads * (llama.hidden_size // llama.attention_heads) * GENERATION_TOKENS * 2
    assert kv == 2 * GIB
    estimate = estimate_generation(llama)
    assert estimate.activations > kv and 9 * GIB < estimate.total < 12 * GIB
    assert estimate_generation(phi).activations > estimate.activations
    phi_kv = 2 * phi.layers * phi.kv_heads * (phi.hidden_size // phi.attention_heads) * GENERATION_TOKENS * 2
    assert phi_kv == 6 * GIB > kv

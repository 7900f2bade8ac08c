"""The base model in 4-bit NF4 (or full precision) with LoRA adapters on top, via bitsandbytes and peft."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from shared.jobspec import JobSpec
from worker.trainer.attention import PACKED


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype() -> torch.dtype:
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16  # pre-Ampere gaming cards (GTX 10xx, RTX 20xx)
    return torch.bfloat16


def quantization_config() -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(),
    )


def keep_4bit_weights_trainable(model: torch.nn.Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference.

    With bitsandbytes 0.50 on CPUs with avx512_bf16, any eval-mode forward without grad repacks the weights
    in place, and later backward passes then compute wrong LoRA gradients while the loss still falls
    (measured: cosine 0.37 against a dequantized reference). Training evaluates between steps, so the
    repacking must never happen. Returns how many layers were guarded.
    """
    guarded = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            guarded += 1
    return guarded


def load_tokenizer(model_dir: Path):  # type: ignore[no-untyped-def]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(model_dir: Path, *, quantization: str, gradient_checkpointing: bool,  # type: ignore[no-untyped-def]
              attention: str = PACKED):
    """The base model; it attends through worker/trainer/attention.py (flat or dense batches), or with
    `attention="sdpa"` through transformers' own, which generation's padded prompts need."""
    kwargs = {"dtype": compute_dtype(), "device_map": str(device()), "attn_implementation": attention}
    if quantization == "nf4":
        kwargs["quantization_config"] = quantization_config()
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    for parameter in model.parameters():  # the base is frozen; LoRA's weights (peft's, float32) are what trains
        parameter.requires_grad = False
    if gradient_checkpointing:
        _checkpoint_layers(model)
    if quantization == "nf4":
        keep_4bit_weights_trainable(model)
    return model


def _checkpoint_layers(model) -> None:  # type: ignore[no-untyped-def]
    """Each decoder layer's activations recomputed in the backward pass, its input alone kept. Non-reentrant
    checkpointing needs no gradient on the embeddings' output (the reentrant kind does, and peft's
    `prepare_model_for_kbit_training` turns it on for that). That function also casts every 16-bit weight left
    to float32, the embeddings and the LM head with them (4.2 GB instead of 2.1 for Llama 3 8B's 128k
    vocabulary), which carries the whole residual stream and the head's matrix product in float32: it is not
    used here, so they stay in the compute dtype, as torchtune and Unsloth keep them."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x; the older name warns
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def with_lora(model, spec: JobSpec):  # type: ignore[no-untyped-def]
    lora = spec.lora
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
        target_modules=lora.target_modules if lora.target_modules != "all-linear" else "all-linear",
    )
    return get_peft_model(model, config)


def load_for_training(spec: JobSpec):  # type: ignore[no-untyped-def]
    # Gradient checkpointing trades compute for memory: worth it on a GPU, a 10x slowdown on the CPU (measured).
    model = load_base(Path(spec.model_dir), quantization=spec.quantization,
                      gradient_checkpointing=torch.cuda.is_available())
    return with_lora(model, spec)


def load_adapter(model_dir: Path, adapter_dir: Path, *, quantization: str = "nf4"):  # type: ignore[no-untyped-def]
    """A freshly loaded base with a trained adapter on top (how a customer would use the result)."""
    base = load_base(model_dir, quantization=quantization, gradient_checkpointing=False)
    model = PeftModel.from_pretrained(base, adapter_dir)
    keep_4bit_weights_trainable(model)
    return model

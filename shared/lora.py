"""The LoRA tensors a job implies: PEFT's names and shapes for a catalog model, a rank and target modules.

The coordinator checks adapters and checkpoints against this, the trainer checks what it resumes from, and the
memory estimator counts its parameters: one definition of what a job's LoRA weights look like.
"""

from __future__ import annotations

from collections.abc import Iterable

from shared.catalog import BaseModelSpec

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})


def target_names(target_modules: str | Iterable[str]) -> tuple[str, ...]:
    """The module names LoRA wraps, in the catalog's order ("all-linear" is every projection)."""
    if target_modules == "all-linear":
        return ALL_LINEAR
    chosen = set(target_modules)
    return tuple(m for m in ALL_LINEAR if m in chosen)


def module_dims(base: BaseModelSpec) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection."""
    head_dim = base.hidden_size // base.attention_heads
    q_out, kv_out = base.attention_heads * head_dim, base.kv_heads * head_dim
    return {"q_proj": (base.hidden_size, q_out), "k_proj": (base.hidden_size, kv_out),
            "v_proj": (base.hidden_size, kv_out), "o_proj": (q_out, base.hidden_size),
            "gate_proj": (base.hidden_size, base.intermediate_size),
            "up_proj": (base.hidden_size, base.intermediate_size),
            "down_proj": (base.intermediate_size, base.hidden_size)}


def lora_shapes(base: BaseModelSpec, *, r: int, target_modules: str | Iterable[str] = "all-linear") -> dict[str, tuple[int, ...]]:
    """PEFT's saved names (`get_peft_model_state_dict`) and shapes of every LoRA weight, layer by layer."""
    dims = module_dims(base)
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(base.layers):
        for module in target_names(target_modules):
            block = "self_attn" if module in ATTENTION else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            n_in, n_out = dims[module]
            shapes[f"{prefix}.lora_A.weight"] = (r, n_in)
            shapes[f"{prefix}.lora_B.weight"] = (n_out, r)
    return shapes


def lora_parameter_count(base: BaseModelSpec, *, r: int, target_modules: str | Iterable[str] = "all-linear") -> int:
    dims = module_dims(base)
    return base.layers * sum(r * sum(dims[m]) for m in target_names(target_modules))

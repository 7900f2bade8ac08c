"""A base model's own tensors as Hugging Face saves them (names, shapes), and the export formats each model offers.

The coordinator checks a merged export against these names and shapes, the export program merges a job's LoRA
weights into exactly these tensors, and the API refuses a format a model cannot be exported to: one definition of
what a model's weights look like, beside `shared/lora.py` for its adapters.
"""

from __future__ import annotations

import re
from typing import Literal

from shared.catalog import BaseModelSpec
from shared.errors import InvalidRequest
from shared.lora import ATTENTION, module_dims

ExportFormat = Literal["merged", "gguf:f16", "gguf:q8_0", "gguf:q4_k_m"]
FORMATS: tuple[str, ...] = ("merged", "gguf:f16", "gguf:q8_0", "gguf:q4_k_m")
GGUF_TYPES = {"gguf:f16": "F16", "gguf:q8_0": "Q8_0", "gguf:q4_k_m": "Q4_K_M"}  # llama.cpp's names
# Bytes per weight of each GGUF type (Q4_K_M mixes 4- and 6-bit blocks: about 4.85 bits on Llama 3).
GGUF_BYTES_PER_WEIGHT = {"gguf:f16": 2.0, "gguf:q8_0": 34 / 32, "gguf:q4_k_m": 0.61}
# What a merged model's folder holds (worker/trainer/merge.py): the weights, one file or numbered shards with an index,
# and the files a customer's `from_pretrained` needs beside them. The agent packs these names only; the coordinator
# accepts these names only.
MERGED_SIDE_FILES = frozenset({"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                               "special_tokens_map.json", "chat_template.jinja", "tokenizer.model",
                               "model.safetensors.index.json"})
MERGED_SHARD = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
MERGED_ARCHITECTURES = frozenset({"llama", "qwen2"})  # names and shapes below hold for these
GGUF_ARCHITECTURES = frozenset({"llama", "qwen2"})  # the converter (worker/trainer/gguf_export.py) knows these


def merged_member(name: str) -> bool:
    """Whether a merged model's archive may hold a file of this name."""
    return name == "model.safetensors" or name in MERGED_SIDE_FILES or MERGED_SHARD.fullmatch(name) is not None


def export_name(fmt: str) -> str:
    """Where the export program writes a format under `out/exports/` (the agent derives it the same way, never
    from the program's files): the merged model's folder, or a GGUF file."""
    return "merged" if fmt == "merged" else f"model-{fmt.removeprefix('gguf:')}.gguf"


def weight_shapes(base: BaseModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model's `model.safetensors` (all shards together), by name."""
    if base.architecture not in MERGED_ARCHITECTURES:
        raise ValueError(f"no weight layout for architecture {base.architecture!r}")
    dims = module_dims(base)
    hidden = base.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (base.vocab_size, hidden),
                                          "model.norm.weight": (hidden,)}
    if not base.tied_embeddings:
        shapes["lm_head.weight"] = (base.vocab_size, hidden)
    for layer in range(base.layers):
        prefix = f"model.layers.{layer}"
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
        for module, (n_in, n_out) in dims.items():
            block = "self_attn" if module in ATTENTION else "mlp"
            shapes[f"{prefix}.{block}.{module}.weight"] = (n_out, n_in)
            if base.attention_bias and module in ("q_proj", "k_proj", "v_proj"):
                shapes[f"{prefix}.{block}.{module}.bias"] = (n_out,)
    return shapes


def formats_for(base: BaseModelSpec) -> tuple[str, ...]:
    """The export formats this model offers."""
    offered = []
    if base.architecture in MERGED_ARCHITECTURES:
        offered.append("merged")
        if base.architecture in GGUF_ARCHITECTURES and base.tokenizer_pre is not None:
            offered.extend(GGUF_TYPES)
    return tuple(offered)


def check_formats(base: BaseModelSpec, formats: list[str], *, param: str = "export") -> list[str]:
    """The formats asked for, each once and in the catalog's order; a 400 naming what the model offers otherwise."""
    if not formats:
        raise InvalidRequest("Name at least one export format.", param=param, code="invalid_export")
    offered = formats_for(base)
    for fmt in formats:
        if fmt not in FORMATS:
            raise InvalidRequest(f"Unknown export format {fmt!r}; choose from {', '.join(FORMATS)}.", param=param,
                                 code="invalid_export")
        if fmt not in offered:
            what = ", ".join(offered) if offered else "none yet"
            raise InvalidRequest(f"{base.id} cannot be exported as {fmt} (it offers: {what}).", param=param,
                                 code="export_not_available")
    return [fmt for fmt in FORMATS if fmt in formats]


def export_bytes(base: BaseModelSpec, fmt: str) -> int:
    """About how large an export of the model is: 16-bit weights merged, or the GGUF type's bits per weight."""
    if fmt == "merged":
        return 2 * base.parameters
    return int(GGUF_BYTES_PER_WEIGHT[fmt] * base.parameters)

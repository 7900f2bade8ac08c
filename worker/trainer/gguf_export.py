"""A merged model as GGUF for llama.cpp and Ollama: F16 written with llama.cpp's own `gguf` package, then Q8_0 or
Q4_K_M made by llama.cpp's quantizer (`llama_model_quantize`, through llama-cpp-python), as `llama-quantize` does.

The conversion follows llama.cpp's `convert_hf_to_gguf.py` for the two architectures it knows here (Llama and
Qwen 2): tensor names from `gguf.TensorNameMap`, Llama's q/k rows permuted from Hugging Face's rotate-half layout to
GGML's interleaved RoPE, 1-D tensors in float32, the byte-level BPE vocabulary with token types, and the merges,
special tokens and chat template read by `gguf.SpecialVocab`.
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from shared.catalog import BaseModelSpec
from shared.weights import GGUF_TYPES
from worker.trainer.errors import WorkerError
from worker.trainer.merge import layout

ARCHITECTURES = {"llama": "LLAMA", "qwen2": "QWEN2"}


class ConversionFailed(WorkerError):
    pass


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's q/k rows (two halves per head) in the order GGML's RoPE reads them (pairs)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _vocabulary(model_dir: Path, vocab_size: int):  # type: ignore[no-untyped-def]
    """(tokens, token types) by id, as convert_hf_to_gguf's `get_vocab_base` builds them."""
    import gguf  # noqa: PLC0415
    from transformers import AutoTokenizer  # noqa: PLC0415

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            special = decoder[i].special if i in decoder else False
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
            tokens.append(token)
        else:
            types.append(gguf.TokenType.NORMAL)
            tokens.append(token)
    return tokens, types


def _gguf_tensor(base: BaseModelSpec, hf_name: str, data: np.ndarray) -> np.ndarray:
    """A merged tensor as the GGUF file holds it: Llama's q/k rows permuted, matrices in float16."""
    if base.architecture == "llama" and hf_name.endswith("q_proj.weight"):
        data = _permute(data, base.attention_heads)
    elif base.architecture == "llama" and hf_name.endswith("k_proj.weight"):
        data = _permute(data, base.kv_heads)
    return data.astype(np.float32 if data.ndim == 1 else np.float16)


def write_f16(*, model_dir: Path, base: BaseModelSpec, out: Path, name: str,
              tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]) -> Path:
    """An F16 GGUF file of the model whose tensors `tensors()` yields in the base's order (`merge.layout`), with
    the config and tokenizer of `model_dir`. Tensors are written as they come: the model is never all in memory."""
    import gguf  # noqa: PLC0415

    if base.architecture not in ARCHITECTURES or base.tokenizer_pre is None:
        raise ConversionFailed(f"{base.id} cannot be converted to GGUF here")
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[base.architecture])
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        raise ConversionFailed("the base's config.json is unreadable") from None
    head_dim = base.hidden_size // base.attention_heads
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    writer.add_context_length(int(config.get("max_position_embeddings", base.max_seq_len)))
    writer.add_embedding_length(base.hidden_size)
    writer.add_block_count(base.layers)
    writer.add_feed_forward_length(base.intermediate_size)
    writer.add_head_count(base.attention_heads)
    writer.add_head_count_kv(base.kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(base.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens, types = _vocabulary(model_dir, base.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(base.tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)
    names = gguf.get_tensor_name_map(arch, base.layers)
    extra: list[tuple[str, np.ndarray]] = []
    if (config.get("rope_scaling") or {}).get("rope_type") == "llama3":  # Llama 3.1's long-context frequencies
        extra.append(("rope_freqs.weight", _llama3_rope_factors(config, head_dim)))
    plan = []
    for hf_name, shape in layout(model_dir):
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ConversionFailed(f"no GGUF name for {hf_name}")
        dtype = np.dtype(np.float32 if len(shape) == 1 else np.float16)
        plan.append(hf_name)
        writer.add_tensor_info(target, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    for target, data in extra:
        writer.add_tensor_info(target, data.shape, data.dtype, data.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for expected, (hf_name, tensor) in zip(plan, tensors(), strict=True):
        if hf_name != expected:
            raise ConversionFailed(f"tensors came out of order ({hf_name}, expected {expected})")
        writer.write_tensor_data(_gguf_tensor(base, hf_name, tensor.to(torch.float32).numpy()))
    for _, data in extra:
        writer.write_tensor_data(data)
    writer.close()
    return out


def _llama3_rope_factors(config: dict, head_dim: int) -> np.ndarray:  # type: ignore[type-arg]
    """Llama 3.1's per-frequency RoPE factors (convert_hf_to_gguf's LlamaModel.generate_extra_tensors)."""
    import math  # noqa: PLC0415

    scaling = config["rope_scaling"]
    base = float(config.get("rope_theta", 10000.0))
    factor, low, high = scaling.get("factor", 8.0), scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def quantize(*, source: Path, out: Path, fmt: str, threads: int | None = None) -> Path:
    """`source` (F16 GGUF) quantized by llama.cpp to the format's type (Q8_0, Q4_K_M)."""
    try:
        import llama_cpp  # noqa: PLC0415 - only the quantized formats need llama.cpp
    except ImportError as exc:
        raise ConversionFailed(f"llama.cpp (llama-cpp-python) is not installed on this worker: {exc}") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{GGUF_TYPES[fmt]}")
    params.nthread = threads or os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0 or not out.is_file():
        raise ConversionFailed(f"llama.cpp could not quantize to {GGUF_TYPES[fmt]} (code {code})")
    return out

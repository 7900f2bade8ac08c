"""How the examples packed together attend: each only to itself and causally, without an (L x L) mask where a kernel
can take the examples' boundaries instead.

A batch comes in one of two layouts (worker/trainer/batches.py). *Dense*: rows padded to the longest, with a
(B, 1, L, L) boolean mask, which keeps SDPA off its fastest kernels on a GPU and costs memory quadratic in the row
length. *Flat*: every token of the batch in one sequence (1, T), no padding at all, and the examples' boundaries as
cumulative offsets (`cu_seq_lens_q`, the names Hugging Face's flash-attention path uses). A flat batch attends
through one of two kernels:

- `varlen`: PyTorch's flash-attention kernel for variable-length sequences (`torch.nn.attention.varlen`, CUDA,
  16-bit), which never forms a mask or a score matrix;
- `segments`: SDPA causal over each example in turn, on any device (the CPU's flat path, and the reference the
  varlen kernel is tested against).

The trainer's models load with `attn_implementation=PACKED`, registered here with transformers; a batch of either
layout passes through it. What the fast kernels cannot express falls back to masks built for the layer, so the
result is always right: a sliding window shorter than an example, to a windowed mask for that example; a soft cap on
attention logits (Gemma 2) or attention dropout, to the model's eager attention (or SDPA) one example at a time, so
its scores never span the whole micro-batch. A card older than Ampere, which PyTorch's flash kernels refuse, keeps
dense batches (and a flat one there attends per example).
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PACKED = "tunegrid_packed"


def flat_layout(device: torch.device) -> bool:
    """Whether batches on `device` are flattened (no padding, no mask). On the CPU the dense layout measured
    faster for the short rows the CPU trains on (bench/trainer.py: per-example SDPA calls cost more than
    the padding and the mask they save); on a GPU the flat layout is the point, where the varlen kernel runs
    (Ampere and newer: an older card keeps dense masks, which SDPA's memory-efficient kernel takes)."""
    return device.type == "cuda" and _ampere(device)


def _ampere(device: torch.device | str) -> bool:
    """Compute capability 8.0 or newer: what PyTorch's flash kernels run on (not a Turing RTX 20xx)."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


@cache
def _varlen() -> tuple[Any, frozenset[str]] | None:
    """`varlen_attn` and the names of its keyword arguments, where this PyTorch has it (2.10 and later); its
    signature moved between releases (`is_causal` in 2.10, `window_size` and `enable_gqa` later)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: PLC0415
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def kernel(query: torch.Tensor, window: int | None = None) -> str:
    """Which kernel a flat batch of these queries attends through (2.10's varlen kernel has no sliding window)."""
    varlen = _varlen()
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and varlen is not None \
            and (not window or "window_size" in varlen[1]) and _flash_capable(query):
        return "varlen"
    return "segments"


def _flash_capable(query: torch.Tensor) -> bool:
    """PyTorch's flash kernels refuse cards older than Ampere (a Turing card, which placement accepts, attends per
    example instead) and head sizes past 256 or not a multiple of 8."""
    head_dim = query.shape[-1]
    return _ampere(query.device) and head_dim <= 256 and head_dim % 8 == 0


def _expand_kv(states: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., kv_heads, D) repeated to `heads` query heads, for a kernel that takes no grouped-query attention."""
    groups = heads // states.shape[-2]
    return states if groups == 1 else states.repeat_interleave(groups, dim=-2)


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor,
                     max_length: int, *, scaling: float | None, window: int | None,
                     varlen: tuple[Any, frozenset[str]] | None = None) -> torch.Tensor:
    """(T, H, D) queries against (T, Hkv, D) keys and values, causal within each example of `cu_seq_lens`;
    `window`: how many tokens (itself included) a token sees at most."""
    function, names = varlen or _varlen()  # type: ignore[misc]
    kwargs: dict[str, Any] = {}
    if "enable_gqa" in names:
        kwargs["enable_gqa"] = True
    else:
        key, value = _expand_kv(key, query.shape[-2]), _expand_kv(value, query.shape[-2])
    if "scale" in names and scaling is not None:
        kwargs["scale"] = scaling
    if "window_size" in names:
        kwargs["window_size"] = (window - 1 if window else -1, 0)  # (left, right): right 0 is causal
    else:  # kernel() never sends a window here
        kwargs["is_causal"] = True
    cu = cu_seq_lens.to(torch.int32)
    return function(query, key, value, cu, cu, max_length, max_length, **kwargs)


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor, *,
                      scaling: float | None, window: int | None = None) -> torch.Tensor:
    """The same as `varlen_attention`, one example at a time through SDPA: (1, H, T, D) in, (1, T, H, D) out."""
    bounds = cu_seq_lens.tolist()
    groups = query.shape[1] // key.shape[1]
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        n = end - start
        mask = _one_example(n, window, query.device) if window and n > window else None
        pieces.append(torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling, enable_gqa=groups > 1))
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous()


def block_mask(cu_seq_lens: torch.Tensor, total: int, *, window: int | None = None) -> torch.Tensor:
    """The (1, 1, T, T) boolean mask of a flat batch: causal within each example, and within `window`."""
    at = torch.arange(total, device=cu_seq_lens.device)
    example = torch.bucketize(at, cu_seq_lens[1:], right=True)
    mask = (example[:, None] == example[None, :]) & (at[:, None] >= at[None, :])
    if window:
        mask &= at[:, None] - at[None, :] < window
    return mask[None, None]


def _one_example(length: int, window: int | None, device: torch.device) -> torch.Tensor:
    return block_mask(torch.tensor([0, length], device=device), length, window=window)


def _window(module: torch.nn.Module, kwargs: dict[str, Any]) -> int | None:
    return kwargs.get("sliding_window") or getattr(module, "sliding_window", None)


def _eager(module: torch.nn.Module) -> Any:
    """The model's own eager attention (the one that knows its soft cap)."""
    import sys  # noqa: PLC0415

    return sys.modules[type(module).__module__].eager_attention_forward


def _masked(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            mask: torch.Tensor, *, dropout: float, scaling: float | None, softcap: float | None) -> torch.Tensor:
    """(B, H, L, D) through a boolean mask: the model's eager attention where logits are capped (SDPA caps
    nothing), SDPA otherwise; (B, L, H, D) out."""
    if softcap:
        additive = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
        additive.masked_fill_(~mask, torch.finfo(query.dtype).min)
        return _eager(module)(module, query, key, value, additive, dropout=dropout, scaling=scaling,
                              softcap=softcap)[0]
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling)[0]


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: (B, H, L, D) queries, (B, Hkv, L, D) keys and values in; (B, L, H, D) out."""
    if attention_mask is not None and attention_mask.ndim != 4:
        raise ValueError(f"{PACKED} takes a flat batch or a 4-D mask; generation loads the model with sdpa")
    cu_seq_lens, window, softcap = kwargs.get("cu_seq_lens_q"), _window(module, kwargs), kwargs.get("softcap")
    length = query.shape[2]
    if cu_seq_lens is not None:
        if query.shape[0] != 1:
            raise ValueError("a flat batch is one sequence")
        if not softcap and not dropout:
            if kernel(query, window) == "varlen":
                out = varlen_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                                       cu_seq_lens, int(kwargs["max_length_q"]), scaling=scaling, window=window)
                return out[None], None
            return segment_attention(query, key, value, cu_seq_lens, scaling=scaling, window=window), None
        # What the kernels cannot do (a soft cap, dropout), one example at a time through its own mask: scores as a
        # dense row's at most, never the whole micro-batch's (T x T).
        bounds = cu_seq_lens.tolist()
        pieces = []
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            mask = _one_example(end - start, window, query.device)
            pieces.append(_masked(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], mask,
                                  dropout=dropout, scaling=scaling, softcap=softcap))
        return torch.cat(pieces, dim=1), None
    if attention_mask is not None and window:  # a dense batch's examples are contiguous: the window is i - j
        at = torch.arange(length, device=query.device)
        attention_mask = attention_mask & (at[:, None] - at[None, :] < window)
    elif attention_mask is None and (window or softcap):  # one plain sequence
        attention_mask = _one_example(length, window, query.device)
    if attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                      is_causal=True)
    return _masked(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, softcap=softcap), None


def _mask(*, attention_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor | None:
    """transformers' mask interface: no mask is ever built (a flat batch has its boundaries, a dense one brings its
    4-D mask, which never reaches here); a 2-D padding mask is handed on as it is, for the attention to refuse
    (left unregistered, transformers would drop it without a word)."""
    return attention_mask


AttentionInterface.register(PACKED, packed_attention)
AttentionMaskInterface.register(PACKED, _mask)

"""The trainer's GPU paths checked and measured where they run (bench/gpu.sh runs this first; on the CPU it is a dry
run of the same code on small sizes). Prints figures; never passes or fails, but says MISMATCH where a figure is
outside its tolerance.

1. Packed rows: a small Llama (grouped-query heads, 4-bit when bitsandbytes runs) on the same rows, flat (the varlen
   kernel on a GPU) against dense masks against each example alone: token losses and LoRA gradients.
2. Attention alone at one micro-batch of mixed-length examples: the varlen kernel, SDPA per example and SDPA with
   the dense block mask, forward and backward: time and peak memory.
3. The loss at Llama 3's vocabulary: in one piece against in chunks (forward and backward): time and peak memory.

    python bench/gpu_checks.py [--tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.jobspec import JobSpec  # noqa: E402
from worker.trainer import attention, batches, data  # noqa: E402
from worker.trainer.model import load_for_training  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _peak_reset() -> None:
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(base: int = 0) -> float:
    return (torch.cuda.max_memory_allocated() - base) / 2**20 if CUDA else float("nan")


def _lengths(total: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(16, 1024, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def packed_rows_check(hidden: int, layers: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    from worker.trainer.tiny import build_tokenizer  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                             num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), head_dim=64,
                             max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, pad_token_id=2)
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp)
        build_tokenizer().save_pretrained(tmp)
        quantization = "nf4"
        try:
            import bitsandbytes  # noqa: F401, PLC0415
        except ImportError:
            quantization = "none"
        spec = JobSpec(job_id="check", base_model="tunegrid/tiny-llama", model_dir=tmp, quantization=quantization,
                       lora={"r": 16, "alpha": 32, "dropout": 0.0})
        model = load_for_training(spec).train()  # checkpointing recomputes layers in training mode only
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.02)
    examples = [data.Tokenized(input_ids=ids, labels=ids) for ids in
                (torch.randint(3, 32000, (n,)).tolist() for n in _lengths(3000, seed=1))]
    rows = data.pack(examples, max_seq_len=1024)

    def losses_and_grads(batch_rows: list[data.PackedRow], flat: bool) -> tuple[torch.Tensor, torch.Tensor]:
        batch = batches.collate(batch_rows, pad_id=2, device=DEVICE, flat=flat)
        losses = batches.token_losses(model, batch)
        losses.sum().backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        model.zero_grad(set_to_none=True)
        if flat:
            return losses[0].detach().float(), grads
        return torch.cat([losses[i, : len(r)] for i, r in enumerate(batch_rows)]).detach().float(), grads

    flat, flat_grads = losses_and_grads(rows, True)
    dense, dense_grads = losses_and_grads(rows, False)
    alone_parts, alone_grads = [], torch.zeros_like(flat_grads)
    for example in _in_row_order(rows):
        losses, grads = losses_and_grads(data.unpacked([example]), False)
        alone_parts.append(losses)
        alone_grads += grads
    alone = torch.cat(alone_parts)
    probe = torch.empty(1, device=DEVICE, dtype=torch.bfloat16)
    cosine = torch.nn.functional.cosine_similarity
    return {"kernel": attention.kernel(probe), "quantization": quantization, "examples": len(examples),
            "rows": len(rows), "max_abs_flat_vs_alone": float((flat - alone).abs().max()),
            "max_abs_dense_vs_alone": float((dense - alone).abs().max()),
            "mean_loss": float(alone[alone != 0].mean()),
            "grad_cosine_flat_vs_alone": float(cosine(flat_grads, alone_grads, dim=0)),
            "grad_cosine_dense_vs_alone": float(cosine(dense_grads, alone_grads, dim=0))}


def _in_row_order(rows: list[data.PackedRow]) -> list[data.Tokenized]:
    """The examples as the rows hold them (packing fills earlier rows first, so not in the data's order)."""
    found = []
    for row in rows:
        start = 0
        for n in row.example_lengths():
            found.append(data.Tokenized(input_ids=row.input_ids[start:start + n], labels=row.labels[start:start + n]))
            start += n
    return found


def attention_kernels(tokens: int) -> list[dict]:
    heads, kv_heads, head_dim = (32, 8, 128) if CUDA else (8, 2, 64)
    dtype = torch.bfloat16 if CUDA else torch.float32
    lengths = _lengths(tokens)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    figures = []
    for name in ("varlen", "segments", "dense mask"):
        if name == "varlen" and not (CUDA and attention._varlen()):  # noqa: SLF001
            continue
        torch.manual_seed(0)
        q = torch.randn(1, heads, tokens, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
        k = torch.randn(1, kv_heads, tokens, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
        v = torch.randn(1, kv_heads, tokens, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)

        def once() -> torch.Tensor:
            if name == "varlen":
                return attention.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                                  cu, max(lengths), scaling=None, window=None)
            if name == "segments":
                return attention.segment_attention(q, k, v, cu, scaling=None)
            mask = attention.block_mask(cu, tokens)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

        once().float().sum().backward()  # warm-up
        _sync()
        base = torch.cuda.memory_allocated() if CUDA else 0
        _peak_reset()
        began = time.perf_counter()
        repeats = 5
        for _ in range(repeats):
            out = once()
            out.float().sum().backward()
        _sync()
        figures.append({"kernel": name, "tokens": tokens, "examples": len(lengths),
                        "ms_forward_backward": (time.perf_counter() - began) / repeats * 1000,
                        "peak_mib_above_inputs": _peak_mib(base)})
    return figures


def loss_memory(tokens: int, vocab: int, hidden: int) -> list[dict]:
    dtype = torch.bfloat16 if CUDA else torch.float32
    figures = []
    for name, one_piece in (("one piece", 1 << 60), ("chunks", batches.ONE_PIECE_BYTES)):
        torch.manual_seed(0)
        head = torch.nn.Linear(hidden, vocab, bias=False, device=DEVICE, dtype=dtype)
        head.weight.requires_grad_(False)
        states = torch.randn(1, tokens, hidden, device=DEVICE, dtype=dtype, requires_grad=True)
        targets = torch.randint(0, vocab, (1, tokens), device=DEVICE)
        batches.ONE_PIECE_BYTES = one_piece
        _sync()
        base = torch.cuda.memory_allocated() if CUDA else 0
        _peak_reset()
        began = time.perf_counter()
        batches.losses_from_hidden(states, targets, head).sum().backward()
        _sync()
        figures.append({"loss": name, "tokens": tokens, "vocab": vocab, "ms": (time.perf_counter() - began) * 1000,
                        "peak_mib_above_inputs": _peak_mib(base)})
    batches.ONE_PIECE_BYTES = one_piece
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192 if CUDA else 2048)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if CUDA else "cpu"
    print(f"device={device} torch={torch.__version__} varlen={attention._varlen() is not None}")  # noqa: SLF001
    report: dict = {"device": device}
    report["packed_rows"] = packed = packed_rows_check(*((1024, 4) if CUDA else (256, 2)))
    tolerance = 0.05 if CUDA else 1e-4  # bfloat16 on the GPU; float32 rounding on the CPU
    verdict = "ok" if packed["max_abs_flat_vs_alone"] < tolerance and packed["grad_cosine_flat_vs_alone"] > 0.99 \
        else "MISMATCH"
    print(f"packed rows ({packed['kernel']}, {packed['quantization']}, {packed['examples']} examples in "
          f"{packed['rows']} rows, mean loss {packed['mean_loss']:.3f}): token losses flat vs alone max "
          f"{packed['max_abs_flat_vs_alone']:.2e}, dense vs alone {packed['max_abs_dense_vs_alone']:.2e}; LoRA "
          f"gradients cosine flat {packed['grad_cosine_flat_vs_alone']:.5f}, dense "
          f"{packed['grad_cosine_dense_vs_alone']:.5f}: {verdict}")
    report["attention"] = kernels = attention_kernels(args.tokens)
    for k in kernels:
        print(f"attention {k['kernel']:<11} {k['tokens']} tokens in {k['examples']} examples: "
              f"{k['ms_forward_backward']:8.2f} ms forward+backward, peak {k['peak_mib_above_inputs']:8.1f} MiB")
    report["loss"] = losses = loss_memory(2048 if CUDA else 1024, 128256, 4096 if CUDA else 512)
    for f in losses:
        print(f"loss {f['loss']:<9} {f['tokens']} tokens x {f['vocab']} vocabulary: {f['ms']:8.1f} ms, peak "
              f"{f['peak_mib_above_inputs']:8.1f} MiB")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

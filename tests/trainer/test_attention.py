"""Packed attention (worker/trainer/attention.py): in every layout and kernel, an example packed beside others gets
the losses and gradients it gets alone; the kernels against an independent masked reference (grouped-query heads,
sliding windows); the varlen call's plumbing against a CPU stand-in for the CUDA kernel, in both of the signatures
PyTorch has shipped; models with sliding windows and soft caps (Mistral, Gemma 2 shapes) stay exact too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, MistralConfig

from shared.datasets import parse_line
from shared.jobspec import JobSpec
from tests.trainer.conftest import arithmetic_chat
from worker.trainer import attention, data
from worker.trainer.batches import collate, token_losses
from worker.trainer.model import load_for_training, load_tokenizer

CPU = torch.device("cpu")


def _tokenized(model_dir: Path, n: int = 12) -> tuple[list[data.Tokenized], int]:
    tokenizer = load_tokenizer(model_dir)
    examples = [parse_line(json.dumps(r).encode()) for r in arithmetic_chat(n)]
    return [data.tokenize(e, tokenizer, max_seq_len=256, train_on_inputs=False) for e in examples], \
        tokenizer.pad_token_id


def _model(model_dir: Path):  # type: ignore[no-untyped-def]
    spec = JobSpec(job_id="x", base_model="tunegrid/tiny-llama", model_dir=str(model_dir), quantization="none",
                   lora={"r": 8, "alpha": 16, "dropout": 0.0})
    model = load_for_training(spec)
    torch.manual_seed(0)
    for p in model.parameters():  # LoRA B starts at zero: give the adapter something to differentiate
        if p.requires_grad:
            p.data.normal_(0, 0.02)
    return model.train()


def _per_example(losses: torch.Tensor, rows: list[data.PackedRow]) -> torch.Tensor:
    """A batch's token losses in the rows' order, padding dropped (either layout)."""
    if losses.shape[0] == 1 and losses.shape[1] == sum(len(r) for r in rows):
        return losses[0]
    return torch.cat([losses[i, : len(r)] for i, r in enumerate(rows)])


def _grads(model) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    found = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad and p.grad is not None]
    model.zero_grad(set_to_none=True)
    return found


@pytest.mark.parametrize("flat", [False, True], ids=["dense", "flat"])
def test_packed_examples_get_the_losses_and_gradients_they_get_alone(tiny_model_dir: Path, flat: bool) -> None:
    tokenized, pad_id = _tokenized(tiny_model_dir)
    rows = data.pack(tokenized, max_seq_len=128)
    assert len(rows) > 1 and any(len(set(r.segment_ids)) > 2 for r in rows)
    model = _model(tiny_model_dir)
    alone = torch.cat([token_losses(model, collate(data.unpacked([t]), pad_id=pad_id, device=CPU, flat=False))[0]
                       for t in tokenized])
    alone.sum().backward()
    expected = _grads(model)
    batch = collate(rows, pad_id=pad_id, device=CPU, flat=flat)
    assert batch.flat is flat and (batch.attention_mask is None) is flat
    packed = _per_example(token_losses(model, batch), rows)
    packed.sum().backward()
    got = _grads(model)
    # Attending across examples would move these by whole units; rounding moves them by 1e-6.
    assert torch.allclose(packed, alone, atol=1e-5), (packed - alone).abs().max()
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, rtol=1e-4, atol=1e-6), (g - e).abs().max()


def test_a_flat_batch_holds_every_token_once_with_the_examples_boundaries(tiny_model_dir: Path) -> None:
    tokenized, pad_id = _tokenized(tiny_model_dir, 5)
    rows = data.pack(tokenized, max_seq_len=64)
    batch = collate(rows, pad_id=pad_id, device=CPU, flat=True)
    lengths = [len(t.input_ids) for t in tokenized]
    assert batch.input_ids.shape == (1, sum(lengths)) and batch.tokens == sum(lengths)
    assert batch.cu_seq_lens.tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    assert batch.cu_seq_lens.dtype == torch.int32 and batch.max_length == max(lengths)
    starts = batch.cu_seq_lens[:-1].long()
    assert bool((batch.position_ids[0, starts] == 0).all())
    # The last token of an example never has the next example's first token as its target.
    assert bool((batch.targets[0, starts[1:] - 1] == data.IGNORE).all())
    owners = batch.per_token([[i] * len(r) for i, r in enumerate(rows)], fill=-1)
    assert owners.shape == batch.input_ids.shape and -1 not in owners.tolist()[0]


def _reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: list[int],
               window: int | None, scale: float) -> torch.Tensor:
    """Attention written out: (1, H, T, D) against grouped keys, masked scores, softmax; (1, T, H, D) out."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    total = query.shape[2]
    example = torch.zeros(total, dtype=torch.long)
    for i, start in enumerate(cu[1:-1]):
        example[start:] = i + 1
    at = torch.arange(total)
    allowed = (example[:, None] == example[None, :]) & (at[:, None] >= at[None, :])
    if window:
        allowed &= at[:, None] - at[None, :] < window
    scores = (query @ key.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ value).transpose(1, 2)


CU = [0, 5, 6, 19, 40]


@pytest.mark.parametrize("window", [None, 4])
def test_segment_attention_equals_masked_attention_written_out(window: int | None) -> None:
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 8, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    got = attention.segment_attention(q, k, v, torch.tensor(CU, dtype=torch.int32), scaling=0.25, window=window)
    assert torch.allclose(got, _reference(q, k, v, CU, window, 0.25), atol=1e-5)
    mask = attention.block_mask(torch.tensor(CU), 40, window=window)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    assert torch.allclose(dense.transpose(1, 2), got, atol=1e-5)


def _stand_in(signature: str):  # type: ignore[no-untyped-def]
    """A CPU stand-in for torch.nn.attention.varlen.varlen_attn (CUDA only), in one of its two signatures: 2.10's
    (`is_causal`, heads equal) and later releases' (`window_size`, `enable_gqa`, `scale`). It checks what it is
    handed as the kernel would, and computes with the written-out reference."""
    calls: list[dict[str, Any]] = []

    def check(query, key, value, cu_q, cu_k, max_q, max_k):  # type: ignore[no-untyped-def]
        assert query.ndim == key.ndim == value.ndim == 3 and cu_q.dtype == cu_k.dtype == torch.int32
        assert max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max()) and int(cu_q[-1]) == query.shape[0]

    def run(query, key, value, cu, window, scale):  # type: ignore[no-untyped-def]
        out = _reference(query.transpose(0, 1)[None], key.transpose(0, 1)[None], value.transpose(0, 1)[None],
                         cu.tolist(), window, scale if scale is not None else query.shape[-1] ** -0.5)
        return out[0]

    if signature == "2.10":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):  # type: ignore[no-untyped-def]
            check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)
            assert key.shape[1] == query.shape[1], "2.10 takes no grouped-query heads"
            calls.append({"is_causal": is_causal})
            return run(query, key, value, cu_seq_q, None, None)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,  # type: ignore[no-untyped-def]
                        window_size=(-1, -1), enable_gqa=False):
            check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)
            assert enable_gqa or key.shape[1] == query.shape[1]
            left, right = window_size
            calls.append({"window_size": window_size, "scale": scale})
            assert right == 0, "causal"
            return run(query, key, value, cu_seq_q, left + 1 if left >= 0 else None, scale)
    import inspect  # noqa: PLC0415

    return (varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)), calls


@pytest.mark.parametrize(("signature", "window"), [("2.10", None), ("later", None), ("later", 4)])
def test_varlen_call_with_a_cpu_stand_in_for_the_cuda_kernel(signature: str, window: int | None) -> None:
    torch.manual_seed(2)
    q, k, v = torch.randn(40, 8, 16), torch.randn(40, 2, 16), torch.randn(40, 2, 16)
    varlen, calls = _stand_in(signature)
    got = attention.varlen_attention(q, k, v, torch.tensor(CU), 21, scaling=0.25, window=window, varlen=varlen)
    expected = _reference(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], CU, window,
                          0.25)[0]
    if signature == "2.10":  # no scale argument there: the kernel's own 1/sqrt(D), which is what models use
        expected = _reference(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], CU,
                              window, 16 ** -0.5)[0]
        assert calls == [{"is_causal": True}]
    else:
        assert calls == [{"window_size": (window - 1 if window else -1, 0), "scale": 0.25}]
    assert torch.allclose(got, expected, atol=1e-5)


def test_the_trainer_model_refuses_a_padding_mask_it_would_misread(tiny_model_dir: Path) -> None:
    model = _model(tiny_model_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match="generation loads the model with sdpa"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


def _other_family(tmp_path: Path, config) -> Path:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    return tmp_path


SMALL = {"vocab_size": 200, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256}


@pytest.mark.parametrize("family", ["mistral-window", "gemma2-softcap"])
def test_windows_and_soft_caps_stay_exact_in_a_flat_batch(tmp_path: Path, family: str) -> None:
    """Each example alone through transformers' own eager attention (its masks, windows and caps) against the
    same examples packed flat through ours."""
    if family == "mistral-window":
        config = MistralConfig(**SMALL, sliding_window=6)
    else:
        config = Gemma2Config(**SMALL, sliding_window=6, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                              query_pre_attn_scalar=16)
    model_dir = _other_family(tmp_path, config)
    ours = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention.PACKED).eval()
    theirs = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    torch.manual_seed(3)
    examples = [data.Tokenized(input_ids=ids, labels=ids) for ids in (torch.randint(3, 200, (n,)).tolist()
                                                                      for n in (9, 3, 14))]
    row = data.PackedRow()
    for e in examples:
        row.add(e)
    with torch.no_grad():
        flat = token_losses(ours, collate([row], pad_id=0, device=CPU, flat=True))[0]
        alone = torch.cat([_alone(theirs, e) for e in examples])
    assert torch.allclose(flat, alone, atol=1e-4), (flat - alone).abs().max()


def _alone(model, example: data.Tokenized) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """One example's token losses from the model's own forward pass (its own causal mask, window and caps)."""
    ids = torch.tensor([example.input_ids])
    logits = model(input_ids=ids).logits[0].float()
    losses = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
    return torch.cat([losses, torch.zeros(1)])


def test_a_job_trains_on_flat_batches_as_it_would_on_a_gpu(tiny_model_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer end to end with the GPU's layout forced on the CPU: it learns, evaluates and finishes."""
    from tests.trainer.conftest import progress_lines, write_job  # noqa: PLC0415
    from worker.trainer.__main__ import run  # noqa: PLC0415
    from worker.trainer.errors import EXIT_DONE  # noqa: PLC0415

    monkeypatch.setattr(attention, "flat_layout", lambda device: True)
    job = write_job(tmp_path / "job", tiny_model_dir, train=arithmetic_chat(96), validation=arithmetic_chat(16, seed=9),
                    hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate": 3e-3}, eval_every_steps=5,
                    max_seq_len=128)
    assert run(job) == EXIT_DONE
    lines = progress_lines(job)
    losses = [line["loss"] for line in lines if line["type"] == "step"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 * 0.85, losses
    assert any(line["type"] == "eval" for line in lines) and lines[-1]["type"] == "finished"


def test_a_card_older_than_ampere_attends_per_example(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch's flash kernels refuse Turing cards (RTX 20xx, compute capability 7.5), which placement accepts:
    those take SDPA per example. Simulated: no GPU here, so the query is a stand-in and the capability is told."""
    class Query:
        is_cuda, dtype, device = True, torch.float16, "cuda:0"

        def __init__(self, head_dim: int) -> None:
            self.shape = (1, 8, 100, head_dim)

    varlen, _ = _stand_in("later")
    monkeypatch.setattr(attention, "_varlen", lambda: varlen)
    for capability, head_dim, expected in [((7, 5), 128, "segments"), ((8, 0), 128, "varlen"),
                                           ((9, 0), 64, "varlen"), ((9, 0), 320, "segments"), ((8, 6), 100, "segments")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert attention.kernel(Query(head_dim)) == expected, (capability, head_dim)  # type: ignore[arg-type]
        # and batches are flat only where that kernel runs; the CPU keeps dense masks
        assert attention.flat_layout(torch.device("cuda")) is (capability >= (8, 0))
    assert attention.flat_layout(CPU) is False


def test_soft_capped_attention_in_a_flat_batch_never_spans_the_micro_batch(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Gemma 2 caps its attention logits, which no fast kernel does: its eager attention runs one example at a time,
    so the scores it holds are an example's (n x n), never the whole flat micro-batch's (T x T)."""
    import sys  # noqa: PLC0415

    config = Gemma2Config(**SMALL, sliding_window=64, attn_logit_softcapping=50.0, query_pre_attn_scalar=16)
    ours = AutoModelForCausalLM.from_pretrained(_other_family(tmp_path, config),
                                                attn_implementation=attention.PACKED).eval()
    eager = sys.modules[type(ours.model.layers[0].self_attn).__module__].eager_attention_forward
    widths: list[int] = []

    def recording(module, query, key, value, mask, **kwargs):  # type: ignore[no-untyped-def]
        widths.append(mask.shape[-1])
        return eager(module, query, key, value, mask, **kwargs)

    monkeypatch.setattr(sys.modules[eager.__module__], "eager_attention_forward", recording)
    row = data.PackedRow()
    for n in (9, 3, 14, 20):
        ids = list(range(3, 3 + n))
        row.add(data.Tokenized(input_ids=ids, labels=ids))
    with torch.no_grad():
        token_losses(ours, collate([row], pad_id=0, device=CPU, flat=True))
    assert widths and max(widths) == 20 < len(row)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_one_plain_sequence_keeps_its_window_and_cap(tmp_path: Path, family: str) -> None:
    """Called with neither a mask nor boundaries (one sequence), the packed attention still applies the window and
    the cap, as the model's own eager attention does."""
    config = (MistralConfig(**SMALL, sliding_window=5) if family == "mistral" else
              Gemma2Config(**SMALL, sliding_window=5, attn_logit_softcapping=50.0, query_pre_attn_scalar=16))
    model_dir = _other_family(tmp_path, config)
    ours = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention.PACKED).eval()
    theirs = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    ids = torch.randint(3, 200, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-4)

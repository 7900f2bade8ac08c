"""Tokenization, loss masks and packing: only assistant tokens learn, packed examples never see each other."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shared.datasets import parse_line
from worker.trainer import data
from worker.trainer.model import load_tokenizer
from worker.trainer.train import collate


def _example(obj: dict):  # type: ignore[no-untyped-def]
    return parse_line(json.dumps(obj).encode())


CHAT = {"messages": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4"}]}


def test_only_assistant_tokens_carry_loss(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenized = data.tokenize(_example(CHAT), tokenizer, max_seq_len=256, train_on_inputs=False)
    trained = tokenizer.decode([t for t, label in zip(tokenized.input_ids, tokenized.labels) if label != data.IGNORE])
    assert "4" in trained and "plus" not in trained and "user" not in trained
    everything = data.tokenize(_example(CHAT), tokenizer, max_seq_len=256, train_on_inputs=True)
    assert all(label != data.IGNORE for label in everything.labels)


def test_prompt_completion_trains_on_the_completion(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenized = data.tokenize(_example({"prompt": "Q: 2+2?", "completion": " A: 4"}), tokenizer, max_seq_len=64,
                              train_on_inputs=False)
    trained = tokenizer.decode([t for t, label in zip(tokenized.input_ids, tokenized.labels) if label != data.IGNORE])
    assert "4" in trained and "Q:" not in trained


def test_packed_examples_keep_their_positions_and_never_attend_across(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    examples = [data.tokenize(_example(CHAT), tokenizer, max_seq_len=64, train_on_inputs=False) for _ in range(3)]
    rows = data.pack(examples, max_seq_len=64)
    length = len(examples[0].input_ids)
    assert len(rows) == max(1, 3 // (64 // length)) or len(rows) < 3
    row = rows[0]
    assert row.position_ids[:length] == list(range(length)) and row.position_ids[length] == 0
    batch = collate(rows, pad_id=tokenizer.pad_token_id, device=torch.device("cpu"))
    mask = batch.attention_mask[0, 0]
    assert not mask[length, length - 1] and mask[length, length] and not mask[0, 1]  # no cross, causal
    # The first token of the second example is never a target of the first.
    assert batch.targets[0, length - 1] == data.IGNORE


def test_a_tokenizer_without_chat_template_gets_the_fallback_framing(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    with_template = data.tokenize(_example(CHAT), tokenizer, max_seq_len=256, train_on_inputs=False)
    tokenizer.chat_template = None
    fallback = data.tokenize(_example(CHAT), tokenizer, max_seq_len=256, train_on_inputs=False)
    # The tiny model's template is the fallback framing written in Jinja, so both must agree token for token.
    assert fallback.input_ids == with_template.input_ids and fallback.labels == with_template.labels

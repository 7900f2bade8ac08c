"""Tokenization, loss masks and packing: only assistant tokens learn, packed examples never see each other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared.datasets import parse_line
from worker.trainer import data
from worker.trainer.errors import UserError
from worker.trainer.model import load_tokenizer
from worker.trainer.batches import collate


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
    tokenizer.chat_template = None
    fallback = data.tokenize(_example(CHAT), tokenizer, max_seq_len=256, train_on_inputs=False)
    text = tokenizer.decode(fallback.input_ids)
    assert text.startswith("<|user|>\nWhat is 2 plus 2?<|end|>\n<|assistant|>\n4<|end|>")
    assert tokenizer.decode([t for t, label in zip(fallback.input_ids, fallback.labels) if label != data.IGNORE]) \
        == "4<|end|>\n</s>"


# -- tool calling through the model's own template ---------------------------------------------------------------
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
TOOL_CHAT = {
    "tools": [WEATHER],
    "messages": [
        {"role": "developer", "content": "Use the tools."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": "18 C"},
        {"role": "tool", "tool_call_id": "b", "content": "25 C"},
        {"role": "assistant", "content": "Paris is 18 C, Rome 25 C.", "weight": 0},
        {"role": "user", "content": "Which is warmer?"},
        {"role": "assistant", "content": "Rome."},
    ],
}


def _trained_runs(tokenizer, tokenized: data.Tokenized) -> list[str]:  # type: ignore[no-untyped-def]
    """The decoded stretches of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(tokenized.input_ids, tokenized.labels):
        if label != data.IGNORE:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_a_tool_dataset_trains_only_the_weighted_assistant_turns_of_the_templates_rendering(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    example = _example(TOOL_CHAT)
    tokenized = data.tokenize(example, tokenizer, max_seq_len=512, train_on_inputs=False)
    rendered = tokenizer.apply_chat_template([m.for_template() for m in example.messages], tools=[WEATHER],
                                             tokenize=False)
    # The sequence is the template's own rendering: tool definitions in the system turn, calls as <tool_call>.
    assert tokenizer.decode(tokenized.input_ids) == rendered + "</s>"
    assert '"name": "get_weather"' in rendered and "<tool_response>\n18 C\n</tool_response>" in rendered
    calls = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n')
    # Exactly the two weighted assistant turns, without their role headers; the weight-0 answer and every
    # system, user and tool token stay untrained.
    assert _trained_runs(tokenizer, tokenized) == [calls, "Rome.<|im_end|>\n</s>"]
    assert rendered.count("<|im_start|>assistant\n") == 3


def test_train_on_inputs_trains_every_token_of_a_tool_conversation(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenized = data.tokenize(_example(TOOL_CHAT), tokenizer, max_seq_len=512, train_on_inputs=True)
    assert all(label != data.IGNORE for label in tokenized.labels)


def test_a_template_that_cannot_express_tools_is_a_user_error_naming_the_model(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    data.check_expresses_tools(tokenizer, "tunegrid/tiny-llama")  # the tiny model's template can
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}")  # a template that ignores tools and calls, as Gemma 2's does
    with pytest.raises(UserError, match="chat template of gemma-2-2b-it cannot express tools"):
        data.check_expresses_tools(tokenizer, "gemma-2-2b-it")
    tokenizer.chat_template = None
    with pytest.raises(UserError, match="cannot express tools"):
        data.check_expresses_tools(tokenizer, "no-template")


def test_a_template_error_is_the_datas_problem(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = "{{ raise_exception('System role not supported') }}"
    with pytest.raises(UserError, match="cannot render an example: System role not supported"):
        data.tokenize(_example(CHAT), tokenizer, max_seq_len=64, train_on_inputs=False)


def test_a_preference_pair_is_two_sequences_trained_on_their_answers(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    pair = _example({"input": {"messages": [{"role": "user", "content": "What is 2 plus 2?"}]},
                     "preferred_output": [{"role": "assistant", "content": "4"}],
                     "non_preferred_output": [{"role": "assistant", "content": "5"}]})
    chosen, rejected = data.tokenize_pair(pair, tokenizer, max_seq_len=128)
    assert _trained_runs(tokenizer, chosen) == ["4<|im_end|>\n</s>"]
    assert _trained_runs(tokenizer, rejected) == ["5<|im_end|>\n</s>"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"}], tokenize=False,
                                           add_generation_prompt=True)
    assert tokenizer.decode(chosen.input_ids).startswith(prompt)
    with pytest.raises(UserError, match="DPO method"):
        data.tokenize(pair, tokenizer, max_seq_len=128, train_on_inputs=False)

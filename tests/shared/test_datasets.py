"""Dataset validation: every kind of bad line is named with its line number; valid data is counted."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.datasets import TOKENS_PER_EXAMPLE, TOKENS_PER_MESSAGE, parse_line, validate_dataset
from shared.errors import InvalidFile
from tests.conftest import chat_lines


def _lines(texts: list[str]) -> list[bytes]:
    return [t.encode() + b"\n" for t in texts]


def _pc(i: int) -> str:
    return json.dumps({"prompt": f"Q{i}:", "completion": f" A{i}"})


def test_counts_chat_examples_and_estimates_tokens() -> None:
    summary = validate_dataset(_lines(chat_lines(12)))
    assert summary.format == "chat" and summary.examples == 12
    first = parse_line(chat_lines(1)[0].encode())
    assert first.estimated_tokens() >= TOKENS_PER_EXAMPLE + 3 * TOKENS_PER_MESSAGE
    assert summary.estimated_tokens > 12 * (TOKENS_PER_EXAMPLE + 3 * TOKENS_PER_MESSAGE)


def test_prompt_completion_pairs_are_accepted() -> None:
    summary = validate_dataset(_lines([_pc(i) for i in range(10)]))
    assert summary.format == "prompt_completion" and summary.examples == 10


def test_blank_lines_are_skipped_but_keep_line_numbers() -> None:
    lines = _lines(chat_lines(10)) + [b"\n", b'{"messages": []}\n']
    with pytest.raises(InvalidFile, match=r"^Line 12 "):
        validate_dataset(lines)


BAD_LINES = {
    "invalid JSON": ('{"messages": [', "is not valid JSON"),
    "not an object": ("[1, 2]", "must be a JSON object"),
    "neither format": ('{"text": "hi"}', 'must have "messages"'),
    "empty messages": ('{"messages": []}', "non-empty list"),
    "unknown role": ('{"messages": [{"role": "robot", "content": "x"}]}', "role must be one of"),
    "empty content": ('{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}',
                      "messages[0].content is empty"),
    "no assistant": ('{"messages": [{"role": "user", "content": "hi"}]}', "at least one assistant"),
    "content not text": ('{"messages": [{"role": "assistant", "content": 5}]}', "must be a string"),
    "tool calls": ('{"messages": [{"role": "assistant", "content": "x", "tool_calls": []}]}', "unsupported key"),
    "bad weight": ('{"messages": [{"role": "assistant", "content": "x", "weight": 2}]}', "weight must be 0 or 1"),
    "only weight-0 assistant": ('{"messages": [{"role": "assistant", "content": "x", "weight": 0}]}',
                                "at least one assistant"),
    "prompt without completion": ('{"prompt": "x"}', 'no "completion"'),
    "empty completion": ('{"prompt": "x", "completion": ""}', "completion is empty"),
    "deep nesting": ("[" * 100_000 + "]" * 100_000, "JSON"),
    "huge integer": ('{"prompt": "x", "completion": "y", "n": ' + "9" * 5000 + "}", "is not valid JSON"),
    "lone surrogate": ('{"prompt": "\\ud800", "completion": "x"}', "unpaired surrogate"),
}


@pytest.mark.parametrize("bad,reason", BAD_LINES.values(), ids=list(BAD_LINES))
def test_first_bad_line_is_named_with_reason(bad: str, reason: str) -> None:
    lines = _lines(chat_lines(6)) + [bad.encode() + b"\n"] + _lines(chat_lines(6))
    with pytest.raises(InvalidFile) as caught:
        validate_dataset(lines)
    assert caught.value.message.startswith("Line 7 ")
    assert reason in caught.value.message


def test_non_utf8_line_is_named() -> None:
    lines = _lines(chat_lines(3)) + [b'{"prompt": "caf\xe9"}\n']
    with pytest.raises(InvalidFile, match=r"Line 4 is not valid UTF-8"):
        validate_dataset(lines)


def test_a_byte_order_mark_on_the_first_line_is_accepted() -> None:
    lines = _lines(chat_lines(10))
    assert validate_dataset([b"\xef\xbb\xbf" + lines[0], *lines[1:]]).examples == 10


def test_mixed_formats_are_rejected() -> None:
    with pytest.raises(InvalidFile, match=r"Line 11 is in prompt_completion format"):
        validate_dataset(_lines(chat_lines(10) + [_pc(0)]))


def test_fewer_than_ten_examples() -> None:
    with pytest.raises(InvalidFile, match="has 9 examples; at least 10"):
        validate_dataset(_lines(chat_lines(9)))


def test_empty_file() -> None:
    with pytest.raises(InvalidFile, match="no examples"):
        validate_dataset([])


text = st.text(min_size=1, max_size=40).filter(lambda s: s.strip())


@given(st.lists(st.tuples(text, text), min_size=10, max_size=30))
def test_any_well_formed_chat_data_validates(pairs: list[tuple[str, str]]) -> None:
    lines = [
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}).encode()
        for q, a in pairs
    ]
    summary = validate_dataset(lines)
    assert summary.examples == len(pairs)
    assert summary.estimated_tokens == sum(parse_line(line).estimated_tokens() for line in lines)

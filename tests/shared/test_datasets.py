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
    "empty tool calls": ('{"messages": [{"role": "assistant", "content": "x", "tool_calls": []}]}',
                         "tool_calls must be a non-empty list"),
    "unknown message key": ('{"messages": [{"role": "assistant", "content": "x", "audio": {}}]}', "unsupported key"),
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


# -- tool calling -------------------------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def _call(call_id: str = "call_1", name: str = "get_weather", arguments: str = '{"city": "Paris"}') -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_chat(**overrides) -> dict:  # type: ignore[no-untyped-def]
    example = {
        "messages": [
            {"role": "developer", "content": "Use tools when they help."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [_call()]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
            {"role": "assistant", "content": "It is 18 C and sunny in Paris."},
        ],
        "tools": [WEATHER],
        "parallel_tool_calls": False,
    }
    example.update(overrides)
    return example


def test_a_tool_calling_conversation_validates_with_every_openai_field() -> None:
    example = parse_line(json.dumps(tool_chat()).encode())
    assert example.format == "chat" and example.uses_tools
    call = example.messages[2]
    assert call.content is None and call.tool_calls[0].arguments == {"city": "Paris"} and call.trained
    assert example.messages[3].role == "tool" and example.messages[3].tool_call_id == "call_1"
    # The template sees developer as system, arguments as an object, tool definitions as given.
    assert example.messages[0].for_template()["role"] == "system"
    assert call.for_template()["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    summary = validate_dataset([json.dumps(tool_chat()).encode()] * 10)
    assert summary.uses_tools and summary.estimated_tokens > 10 * len(json.dumps(WEATHER)) // 4


def test_a_refusal_trains_as_the_answer() -> None:
    example = parse_line(json.dumps({"messages": [
        {"role": "user", "content": "Help me pick a lock."},
        {"role": "assistant", "content": None, "refusal": "I can't help with that."}]}).encode())
    assert example.messages[1].content == "I can't help with that." and not example.uses_tools


def test_legacy_functions_become_tools() -> None:
    example = parse_line(json.dumps({
        "functions": [WEATHER["function"]],
        "messages": [{"role": "user", "content": "Paris?"},
                     {"role": "assistant", "content": None, "function_call": {"name": "get_weather",
                                                                              "arguments": '{"city": "Paris"}'}},
                     {"role": "function", "name": "get_weather", "content": "18 C"},
                     {"role": "assistant", "content": "18 C."}]}).encode())
    assert example.tools == (WEATHER,) and example.messages[1].tool_calls[0].name == "get_weather"
    assert example.messages[2].role == "tool" and example.messages[2].tool_call_id == example.messages[1].tool_calls[0].id


BAD_TOOL_LINES = {
    "undefined tool": (tool_chat(tools=[{"type": "function", "function": {"name": "other"}}]),
                       "calls 'get_weather', which is not among the example's tools"),
    "arguments not JSON": ({"messages": [{"role": "user", "content": "x"},
                                         {"role": "assistant", "content": None, "tool_calls": [_call(arguments="{")]}]},
                           "arguments is not valid JSON"),
    "arguments an object, not a string": (
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}]},
        "must be a string holding a JSON object"),
    "answer to no call": ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "nope",
                                                                          "content": "1"},
                                        {"role": "assistant", "content": "y"}]}, "which no earlier assistant"),
    "tool message without id": ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "1"},
                                              {"role": "assistant", "content": "y"}]}, "tool_call_id must be"),
    "two calls, parallel off": (tool_chat(messages=[{"role": "user", "content": "x"}, {
        "role": "assistant", "content": None, "tool_calls": [_call("a"), _call("b")]}]), "parallel_tool_calls"),
    "null content without calls": ({"messages": [{"role": "user", "content": "x"},
                                                 {"role": "assistant", "content": None}]}, "may be null only"),
    "bad tool name": (tool_chat(tools=[{"type": "function", "function": {"name": "get weather"}}]), "name must be"),
    "tool not a function": (tool_chat(tools=[{"type": "retrieval"}]), "must be {\"type\": \"function\""),
    "duplicate tool": (tool_chat(tools=[WEATHER, WEATHER]), "defined twice"),
    "tool_calls on a user": ({"messages": [{"role": "user", "content": "x", "tool_calls": [_call()]},
                                           {"role": "assistant", "content": "y"}]}, "only allowed on assistant"),
    "content and refusal": ({"messages": [{"role": "user", "content": "x"},
                                          {"role": "assistant", "content": "y", "refusal": "no"}]}, "both"),
    "unknown top-level key": ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                               "tool_choice": "auto"}, "unsupported key 'tool_choice'"),
}


@pytest.mark.parametrize("bad,reason", BAD_TOOL_LINES.values(), ids=list(BAD_TOOL_LINES))
def test_a_bad_tool_line_is_named_with_reason(bad: dict, reason: str) -> None:
    lines = _lines(chat_lines(3)) + [json.dumps(bad).encode() + b"\n"]
    with pytest.raises(InvalidFile) as caught:
        validate_dataset(lines)
    assert caught.value.message.startswith("Line 4 ") and reason in caught.value.message


# -- preference pairs (DPO) -----------------------------------------------------------------------------------------
def preference(i: int = 0, **overrides) -> dict:  # type: ignore[no-untyped-def]
    example = {"input": {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}]},
               "preferred_output": [{"role": "assistant", "content": f"The answer is {2 * i}."}],
               "non_preferred_output": [{"role": "assistant", "content": "I do not know."}]}
    example.update(overrides)
    return example


def test_preference_pairs_validate_and_count_both_sequences() -> None:
    lines = [json.dumps(preference(i)).encode() for i in range(10)]
    summary = validate_dataset(lines)
    assert summary.format == "preference" and summary.examples == 10 and not summary.uses_tools
    example = parse_line(lines[1])
    assert example.chosen.content == "The answer is 2." and example.rejected.content == "I do not know."
    single = parse_line(json.dumps({"messages": [*preference(1)["input"]["messages"],
                                                 *preference(1)["preferred_output"]]}).encode())
    assert example.estimated_tokens() > 1.5 * single.estimated_tokens()  # the input is run twice


def test_preference_pairs_may_call_tools() -> None:
    example = parse_line(json.dumps(preference(input={"messages": [{"role": "user", "content": "Paris?"}],
                                                      "tools": [WEATHER]},
                                               preferred_output=[{"role": "assistant", "content": None,
                                                                  "tool_calls": [_call()]}])).encode())
    assert example.uses_tools and example.chosen.tool_calls[0].name == "get_weather"


BAD_PREFERENCES = {
    "no input": ({"preferred_output": [], "non_preferred_output": []}, 'has no "input"'),
    "two preferred": (preference(preferred_output=[{"role": "assistant", "content": "a"}] * 2), "exactly one"),
    "user as output": (preference(non_preferred_output=[{"role": "user", "content": "a"}]), "must be \"assistant\""),
    "same answers": (preference(non_preferred_output=preference()["preferred_output"]), "are the same answer"),
    "input ends with assistant": (preference(input={"messages": [{"role": "user", "content": "x"},
                                                                 {"role": "assistant", "content": "y"}]}),
                                  "must end with a user or tool message"),
    "undefined tool in output": (preference(input={"messages": [{"role": "user", "content": "x"}],
                                                   "tools": [{"type": "function", "function": {"name": "other"}}]},
                                            preferred_output=[{"role": "assistant", "content": None,
                                                               "tool_calls": [_call()]}]), "not among"),
    "weight in output": (preference(preferred_output=[{"role": "assistant", "content": "a", "weight": 1}]),
                         "weight has no meaning"),
    "extra key": (preference(score=1), "unsupported key 'score'"),
}


@pytest.mark.parametrize("bad,reason", BAD_PREFERENCES.values(), ids=list(BAD_PREFERENCES))
def test_a_bad_preference_line_is_named_with_reason(bad: dict, reason: str) -> None:
    lines = [json.dumps(preference(i)).encode() for i in range(3)] + [json.dumps(bad).encode()]
    with pytest.raises(InvalidFile) as caught:
        validate_dataset(lines)
    assert caught.value.message.startswith("Line 4 ") and reason in caught.value.message


def test_a_file_mixing_chat_and_preference_is_refused() -> None:
    with pytest.raises(InvalidFile, match="Line 11 is in preference format"):
        validate_dataset(_lines(chat_lines(10)) + [json.dumps(preference()).encode()])

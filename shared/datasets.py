"""Training data formats (OpenAI's chat JSONL, with tools; prompt/completion pairs; preference pairs for DPO):
parsing, validation, token estimates.

The coordinator validates uploads with it and the trainer reads examples with
it, so both agree on what a valid line is. Every problem is reported with the
1-based line number of the first offending line. The messages themselves
(roles, tools, tool calls) are `shared.messages`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from shared.errors import InvalidFile
from shared.messages import LineError as _LineError, Message, check_calls, conversation, text as _text

UTF8_BOM = b"\xef\xbb\xbf"
MIN_EXAMPLES = 10
# Rough but stable: ~4 UTF-8 bytes per token for English text on BPE vocabularies,
# plus the chat template's per-message framing. Pricing uses it before any tokenizer runs.
BYTES_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
TOKENS_PER_EXAMPLE = 3

DatasetFormat = Literal["chat", "prompt_completion", "preference"]


@dataclass(frozen=True, slots=True)
class TrainingExample:
    format: DatasetFormat
    messages: tuple[Message, ...] = ()  # chat: the conversation; preference: the input before the two answers
    tools: tuple[dict[str, Any], ...] = ()
    prompt: str = ""
    completion: str = ""
    chosen: Message | None = None  # preference: the preferred assistant turn
    rejected: Message | None = None  # preference: the non-preferred one

    @property
    def uses_tools(self) -> bool:
        turns = (*self.messages, *(m for m in (self.chosen, self.rejected) if m is not None))
        return bool(self.tools) or any(m.tool_calls or m.role == "tool" for m in turns)

    def estimated_tokens(self) -> int:
        """Tokens of the sequences the trainer runs: one for chat and prompt/completion, two for a preference
        pair (the input with each answer)."""
        if self.format == "prompt_completion":
            return TOKENS_PER_EXAMPLE + _tokens(self.prompt) + _tokens(self.completion)
        context = TOKENS_PER_EXAMPLE + -(-sum(len(json.dumps(t).encode()) for t in self.tools) // BYTES_PER_TOKEN)
        context += sum(TOKENS_PER_MESSAGE + _bytes_tokens(m.text_bytes()) for m in self.messages)
        if self.format == "chat":
            return context
        assert self.chosen is not None and self.rejected is not None
        return sum(context + TOKENS_PER_MESSAGE + _bytes_tokens(m.text_bytes()) for m in (self.chosen, self.rejected))


@dataclass(frozen=True, slots=True)
class DatasetSummary:
    format: DatasetFormat
    examples: int
    estimated_tokens: int
    uses_tools: bool = False


def _tokens(value: str) -> int:
    return _bytes_tokens(len(value.encode()))


def _bytes_tokens(size: int) -> int:
    return -(-size // BYTES_PER_TOKEN)


def _chat(obj: dict) -> TrainingExample:
    try:
        chat = conversation(obj, allowed={"messages", "tools", "functions", "parallel_tool_calls"})
    except _LineError as exc:
        if str(exc).startswith("unsupported key"):
            raise _LineError(f"{exc}; a chat example has \"messages\" and optionally \"tools\" "
                             "(or \"functions\") and \"parallel_tool_calls\"") from None
        raise
    if not any(m.trained for m in chat.messages):
        raise _LineError("needs at least one assistant message to train on")
    return TrainingExample(format="chat", messages=chat.messages, tools=chat.tools)


def _preference(obj: dict) -> TrainingExample:
    unknown = sorted(set(obj) - {"input", "preferred_output", "non_preferred_output"})
    if unknown:
        raise _LineError(f"unsupported key {unknown[0]!r}; a preference example has \"input\", "
                         "\"preferred_output\" and \"non_preferred_output\"")
    for key in ("input", "preferred_output", "non_preferred_output"):
        if key not in obj:
            raise _LineError(f"has no \"{key}\"")
    if not isinstance(obj["input"], dict):
        raise _LineError("\"input\" must be an object with \"messages\" (and optionally \"tools\")")
    given = conversation(obj["input"], where="input.messages",
                         allowed={"messages", "tools", "functions", "parallel_tool_calls"})
    if given.messages[-1].role == "assistant":
        raise _LineError("input.messages must end with a user or tool message: the outputs are the assistant's "
                         "next turn")
    answers = []
    for key in ("preferred_output", "non_preferred_output"):
        raw = obj[key]
        if not isinstance(raw, list) or len(raw) != 1:
            raise _LineError(f"\"{key}\" must be a list of exactly one assistant message")
        if isinstance(raw[0], dict) and "weight" in raw[0]:
            raise _LineError(f"{key}[0].weight has no meaning in a preference example")
        answer = conversation({"messages": raw}, where=key, allowed={"messages"}).messages[0]
        if answer.role != "assistant":
            raise _LineError(f"{key}[0].role must be \"assistant\"")
        check_calls((*given.messages, answer), tools=given.tools, parallel=given.parallel_tool_calls,
                    where=f"input.messages + {key}")
        answers.append(answer)
    chosen, rejected = answers
    if chosen.content == rejected.content and chosen.tool_calls == rejected.tool_calls:
        raise _LineError("preferred_output and non_preferred_output are the same answer")
    return TrainingExample(format="preference", messages=given.messages, tools=given.tools,
                           chosen=chosen, rejected=rejected)


def _prompt_completion(obj: dict) -> TrainingExample:
    unknown = sorted(set(obj) - {"prompt", "completion"})
    if unknown:
        raise _LineError(f"unsupported key {unknown[0]!r}; a prompt/completion example has only \"prompt\" and \"completion\"")
    if "completion" not in obj:
        raise _LineError("has \"prompt\" but no \"completion\"")
    if "prompt" not in obj:
        raise _LineError("has \"completion\" but no \"prompt\"")
    return TrainingExample(
        format="prompt_completion",
        prompt=_text(obj["prompt"], "prompt"),
        completion=_text(obj["completion"], "completion"),
    )


def parse_line(raw: bytes) -> TrainingExample:
    """One JSONL line as an example; raises `_LineError` with the reason (no line number)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _LineError(f"is not valid UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _LineError(f"is not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise _LineError("is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer longer than Python's 4300-digit limit
        raise _LineError(f"is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise _LineError("must be a JSON object")
    if "messages" in obj:
        return _chat(obj)
    if "input" in obj or "preferred_output" in obj or "non_preferred_output" in obj:
        return _preference(obj)
    if "prompt" in obj or "completion" in obj:
        return _prompt_completion(obj)
    raise _LineError("must have \"messages\" (chat format), \"prompt\" and \"completion\", or \"input\", "
                     "\"preferred_output\" and \"non_preferred_output\" (preference format)")


def iter_examples(lines: Iterable[bytes]) -> Iterable[tuple[int, TrainingExample]]:
    """Parsed examples with their 1-based line numbers; blank lines are skipped.

    Raises `InvalidFile` naming the first bad line, or a line whose format differs
    from the first example's (a file is all chat, all prompt/completion or all preference).
    """
    first_format: DatasetFormat | None = None
    for number, raw in enumerate(lines, start=1):
        if number == 1:
            raw = raw.removeprefix(UTF8_BOM)  # editors on Windows write one; it is not part of the JSON
        if not raw.strip():
            continue
        try:
            example = parse_line(raw.rstrip(b"\r\n"))
        except _LineError as exc:
            raise InvalidFile(f"Line {number} {exc}.", param="file") from None
        if first_format is None:
            first_format = example.format
        elif example.format != first_format:
            raise InvalidFile(
                f"Line {number} is in {example.format} format but the file started in {first_format} format; "
                "use one format per file.",
                param="file",
            )
        yield number, example


def validate_dataset(lines: Iterable[bytes], *, min_examples: int = MIN_EXAMPLES) -> DatasetSummary:
    """Validate a whole JSONL dataset and count what pricing needs."""
    examples = 0
    tokens = 0
    fmt: DatasetFormat | None = None
    uses_tools = False
    for _, example in iter_examples(lines):
        examples += 1
        tokens += example.estimated_tokens()
        fmt = example.format
        uses_tools = uses_tools or example.uses_tools
    if fmt is None:
        raise InvalidFile("The file has no examples; expected JSONL with one example per line.", param="file")
    if examples < min_examples:
        raise InvalidFile(
            f"The file has {examples} example{'s' if examples != 1 else ''}; at least {min_examples} are required.",
            param="file",
        )
    return DatasetSummary(format=fmt, examples=examples, estimated_tokens=tokens, uses_tools=uses_tools)

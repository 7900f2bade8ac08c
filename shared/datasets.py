"""Training data formats (OpenAI chat JSONL and prompt/completion pairs): parsing, validation, token estimates.

The coordinator validates uploads with it and the trainer reads examples with
it, so both agree on what a valid line is. Every problem is reported with the
1-based line number of the first offending line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from shared.errors import InvalidFile

ROLES = ("system", "user", "assistant")
UTF8_BOM = b"\xef\xbb\xbf"
MIN_EXAMPLES = 10
# Rough but stable: ~4 UTF-8 bytes per token for English text on BPE vocabularies,
# plus the chat template's per-message framing. Pricing uses it before any tokenizer runs.
BYTES_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
TOKENS_PER_EXAMPLE = 3

DatasetFormat = Literal["chat", "prompt_completion"]


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str
    weight: int = 1  # 0: an assistant turn shown as context but not trained on


@dataclass(frozen=True, slots=True)
class TrainingExample:
    format: DatasetFormat
    messages: tuple[Message, ...] = ()
    prompt: str = ""
    completion: str = ""

    def estimated_tokens(self) -> int:
        if self.format == "chat":
            return TOKENS_PER_EXAMPLE + sum(
                TOKENS_PER_MESSAGE + _tokens(m.content) for m in self.messages
            )
        return TOKENS_PER_EXAMPLE + _tokens(self.prompt) + _tokens(self.completion)


@dataclass(frozen=True, slots=True)
class DatasetSummary:
    format: DatasetFormat
    examples: int
    estimated_tokens: int


def _tokens(text: str) -> int:
    return -(-len(text.encode()) // BYTES_PER_TOKEN)


class _LineError(Exception):
    pass


def _text(value: object, where: str) -> str:
    """Message content as a string: a plain string or a list of {"type": "text"} parts."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and value:
        parts = []
        for i, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _LineError(f"{where}[{i}] must be a text part {{\"type\": \"text\", \"text\": \"...\"}}")
            parts.append(part["text"])
        text = "".join(parts)
    else:
        raise _LineError(f"{where} must be a string")
    if not text.strip():
        raise _LineError(f"{where} is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # JSON can spell an unpaired surrogate ("\ud800") that no UTF-8 text can hold.
        raise _LineError(f"{where} contains an unpaired surrogate (\\ud800-\\udfff), which is not valid Unicode") from None
    return text


def _chat(obj: dict) -> TrainingExample:
    unknown = sorted(set(obj) - {"messages"})
    if unknown:
        raise _LineError(f"unsupported key {unknown[0]!r}; a chat example has only \"messages\"")
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise _LineError("\"messages\" must be a non-empty list")
    parsed = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _LineError(f"{where} must be an object with \"role\" and \"content\"")
        extra = sorted(set(message) - {"role", "content", "name", "weight"})
        if extra:
            raise _LineError(f"{where} has unsupported key {extra[0]!r}")
        role = message.get("role")
        if role not in ROLES:
            raise _LineError(f"{where}.role must be one of {', '.join(ROLES)} (got {role!r})")
        if "content" not in message:
            raise _LineError(f"{where} has no \"content\"")
        weight = message.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise _LineError(f"{where}.weight must be 0 or 1")
        if weight == 0 and role != "assistant":
            raise _LineError(f"{where}.weight is only allowed on assistant messages")
        parsed.append(Message(role=role, content=_text(message["content"], f"{where}.content"), weight=weight))
    if not any(m.role == "assistant" and m.weight for m in parsed):
        raise _LineError("needs at least one assistant message to train on")
    return TrainingExample(format="chat", messages=tuple(parsed))


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
    if "prompt" in obj or "completion" in obj:
        return _prompt_completion(obj)
    raise _LineError("must have \"messages\" (chat format) or \"prompt\" and \"completion\"")


def iter_examples(lines: Iterable[bytes]) -> Iterable[tuple[int, TrainingExample]]:
    """Parsed examples with their 1-based line numbers; blank lines are skipped.

    Raises `InvalidFile` naming the first bad line, or a line whose format differs
    from the first example's (a file is all chat or all prompt/completion).
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
    for _, example in iter_examples(lines):
        examples += 1
        tokens += example.estimated_tokens()
        fmt = example.format
    if fmt is None:
        raise InvalidFile("The file has no examples; expected JSONL with one example per line.", param="file")
    if examples < min_examples:
        raise InvalidFile(
            f"The file has {examples} example{'s' if examples != 1 else ''}; at least {min_examples} are required.",
            param="file",
        )
    return DatasetSummary(format=fmt, examples=examples, estimated_tokens=tokens)

"""Chat messages and tool definitions in OpenAI's fine-tuning format: parsed, checked, and handed on in the shape
Hugging Face chat templates expect.

Covers what OpenAI's chat and preference files may hold: the `system`, `developer`, `user`, `assistant` and
`tool` roles; `tools` (and the legacy `functions`); assistant `tool_calls` (with `content: null`) and the legacy
`function_call`; `role: "tool"` answering a call by `tool_call_id` (and the legacy `role: "function"`);
`parallel_tool_calls`; `refusal`; and `weight` on assistant turns. Everything is data: a call's `arguments`
must be a JSON object, written as a string the way OpenAI writes it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any


class LineError(Exception):
    """What is wrong with one line (the caller adds its number)."""


ROLES = ("system", "developer", "user", "assistant", "tool")
LEGACY_ROLES = ("function",)
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_ID_CHARS = 128
MAX_DEPTH = 32  # nesting of a call's arguments or a tool's schema: deeper is refused, as templates cannot render it
_MESSAGE_KEYS = {"role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call", "refusal"}
_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Message:
    role: str  # one of ROLES (legacy roles are converted)
    content: str | None  # None: an assistant turn that only calls tools
    weight: int = 1  # 0: an assistant turn shown as context but not trained on
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    @property
    def trained(self) -> bool:
        return self.role == "assistant" and self.weight == 1

    def for_template(self) -> dict[str, Any]:
        """The message as Hugging Face chat templates read it. `developer` is OpenAI's newer name for `system`,
        which is the only one open models' templates know."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": self.content if self.content is not None else ""}
        if self.name is not None and self.role != "tool":
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
            if self.name is not None:
                out["name"] = self.name
        return out

    def text_bytes(self) -> int:
        """Bytes of what the template renders of this message (content and calls), for token estimates."""
        size = len((self.content or "").encode())
        for call in self.tool_calls:
            size += len(call.name) + len(json.dumps(call.arguments, ensure_ascii=False).encode())
        return size


@dataclass(frozen=True, slots=True)
class Conversation:
    messages: tuple[Message, ...]
    tools: tuple[dict[str, Any], ...] = ()
    parallel_tool_calls: bool = True

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) or any(m.tool_calls or m.role == "tool" for m in self.messages)

    def tools_bytes(self) -> int:
        return sum(len(json.dumps(t, ensure_ascii=False).encode()) for t in self.tools)


def text(value: object, where: str, *, allow_empty: bool = False) -> str:
    """Message content as a string: a plain string or a list of {"type": "text"} parts."""
    if isinstance(value, str):
        result = value
    elif isinstance(value, list) and value:
        parts = []
        for i, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise LineError(f"{where}[{i}] must be a text part {{\"type\": \"text\", \"text\": \"...\"}}")
            parts.append(part["text"])
        result = "".join(parts)
    else:
        raise LineError(f"{where} must be a string")
    if not allow_empty and not result.strip():
        raise LineError(f"{where} is empty")
    try:
        result.encode("utf-8")
    except UnicodeEncodeError:
        # JSON can spell an unpaired surrogate ("\ud800") that no UTF-8 text can hold.
        raise LineError(f"{where} contains an unpaired surrogate (\\ud800-\\udfff), which is not valid Unicode") from None
    return result


def _identifier(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_ID_CHARS:
        raise LineError(f"{where} must be a non-empty string of at most {MAX_ID_CHARS} characters")
    text(value, where)
    return value


def _function(spec: object, where: str) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise LineError(f"{where} must be an object with \"name\" (and \"description\", \"parameters\")")
    extra = sorted(set(spec) - _FUNCTION_KEYS)
    if extra:
        raise LineError(f"{where} has unsupported key {extra[0]!r}")
    name = spec.get("name")
    if not isinstance(name, str) or not TOOL_NAME.match(name):
        raise LineError(f"{where}.name must be 1-64 letters, digits, '_' or '-' (got {name!r})")
    if "description" in spec:
        text(spec["description"], f"{where}.description", allow_empty=True)
    if "parameters" in spec and not isinstance(spec["parameters"], dict):
        raise LineError(f"{where}.parameters must be a JSON Schema object")
    plain(spec.get("parameters"), f"{where}.parameters")
    if "strict" in spec and not isinstance(spec["strict"], bool):
        raise LineError(f"{where}.strict must be true or false")
    return dict(spec)


def tools_of(obj: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """The example's `tools` (or legacy `functions`) as OpenAI tool definitions, names unique."""
    if "tools" in obj and "functions" in obj:
        raise LineError("give \"tools\" or the legacy \"functions\", not both")
    tools: list[dict[str, Any]] = []
    if "tools" in obj:
        if not isinstance(obj["tools"], list) or not obj["tools"]:
            raise LineError("\"tools\" must be a non-empty list")
        for i, tool in enumerate(obj["tools"]):
            where = f"tools[{i}]"
            if not isinstance(tool, dict) or tool.get("type") != "function" or set(tool) - {"type", "function"}:
                raise LineError(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}")
            tools.append({"type": "function", "function": _function(tool.get("function"), f"{where}.function")})
    elif "functions" in obj:
        if not isinstance(obj["functions"], list) or not obj["functions"]:
            raise LineError("\"functions\" must be a non-empty list")
        tools = [{"type": "function", "function": _function(f, f"functions[{i}]")}
                 for i, f in enumerate(obj["functions"])]
    names = [t["function"]["name"] for t in tools]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise LineError(f"the tool {duplicate!r} is defined twice")
    return tuple(tools)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a key appears twice")
    return dict(pairs)


def plain(value: object, where: str, depth: int = 0) -> None:
    """JSON data a template can render and a model can learn to write: finite numbers, valid Unicode, at most
    `MAX_DEPTH` levels."""
    if depth > MAX_DEPTH:
        raise LineError(f"{where} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, str):
        text(value, where, allow_empty=True)
    elif isinstance(value, float) and not math.isfinite(value):
        raise LineError(f"{where} holds {value}, which is not a JSON number")
    elif isinstance(value, dict):
        for key, item in value.items():
            text(key, f"{where} (a key)", allow_empty=True)
            plain(item, where, depth + 1)
    elif isinstance(value, list):
        for item in value:
            plain(item, where, depth + 1)


def _arguments(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, str):
        raise LineError(f"{where} must be a string holding a JSON object (as OpenAI writes it)")
    try:  # strictly JSON: no NaN or Infinity, no key twice (the model would learn calls no parser reads)
        parsed = json.loads(value, parse_constant=_refuse_constant, object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, RecursionError, ValueError):
        raise LineError(f"{where} is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise LineError(f"{where} must be a JSON object")
    plain(parsed, where)
    return parsed


def _tool_call(call: object, where: str) -> ToolCall:
    if not isinstance(call, dict) or set(call) - {"id", "type", "function"}:
        raise LineError(f"{where} must be {{\"id\": ..., \"type\": \"function\", \"function\": {{\"name\", "
                        "\"arguments\"}}}}")
    if call.get("type", "function") != "function":
        raise LineError(f"{where}.type must be \"function\"")
    function = call.get("function")
    if not isinstance(function, dict) or set(function) - {"name", "arguments"} or "name" not in function:
        raise LineError(f"{where}.function must be {{\"name\": ..., \"arguments\": \"{{...}}\"}}")
    name = function["name"]
    if not isinstance(name, str) or not TOOL_NAME.match(name):
        raise LineError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-' (got {name!r})")
    return ToolCall(id=_identifier(call.get("id"), f"{where}.id"), name=name,
                    arguments=_arguments(function.get("arguments"), f"{where}.function.arguments"))


def _message(message: object, where: str) -> Message:
    if not isinstance(message, dict):
        raise LineError(f"{where} must be an object with \"role\" and \"content\"")
    extra = sorted(set(message) - _MESSAGE_KEYS)
    if extra:
        raise LineError(f"{where} has unsupported key {extra[0]!r}")
    role = message.get("role")
    if role not in ROLES + LEGACY_ROLES:
        raise LineError(f"{where}.role must be one of {', '.join(ROLES)} (got {role!r})")
    weight = message.get("weight", 1)
    if weight not in (0, 1) or isinstance(weight, bool):
        raise LineError(f"{where}.weight must be 0 or 1")
    if "weight" in message and role != "assistant":
        raise LineError(f"{where}.weight is only allowed on assistant messages")
    for key in ("tool_calls", "function_call", "refusal"):
        if key in message and role != "assistant":
            raise LineError(f"{where}.{key} is only allowed on assistant messages")
    if "tool_call_id" in message and role != "tool":
        raise LineError(f"{where}.tool_call_id is only allowed on tool messages")
    name = message.get("name")
    if name is not None:
        name = _identifier(name, f"{where}.name")
    if role == "assistant":
        return _assistant(message, where, weight=weight, name=name)
    if "content" not in message:
        raise LineError(f"{where} has no \"content\"")
    if role in ("tool", "function"):
        content = text(message["content"], f"{where}.content", allow_empty=True)
        if role == "function":  # legacy: the answer to the function_call named `name`
            if name is None:
                raise LineError(f"{where} (role \"function\") needs the \"name\" of the function it answers")
            return Message(role="tool", content=content, name=name, tool_call_id=f"legacy:{name}")
        return Message(role="tool", content=content, name=name,
                       tool_call_id=_identifier(message.get("tool_call_id"), f"{where}.tool_call_id"))
    return Message(role=role, content=text(message["content"], f"{where}.content"), name=name)


def _assistant(message: dict[str, Any], where: str, *, weight: int, name: str | None) -> Message:
    if "tool_calls" in message and "function_call" in message:
        raise LineError(f"{where} has both \"tool_calls\" and the legacy \"function_call\"")
    calls: list[ToolCall] = []
    if "tool_calls" in message:
        raw = message["tool_calls"]
        if not isinstance(raw, list) or not raw:
            raise LineError(f"{where}.tool_calls must be a non-empty list")
        calls = [_tool_call(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(raw)]
        ids = [c.id for c in calls]
        if len(set(ids)) != len(ids):
            raise LineError(f"{where}.tool_calls repeats an id")
    elif "function_call" in message:
        legacy = message["function_call"]
        if not isinstance(legacy, dict) or set(legacy) - {"name", "arguments"}:
            raise LineError(f"{where}.function_call must be {{\"name\": ..., \"arguments\": \"{{...}}\"}}")
        calls = [_tool_call({"id": f"legacy:{legacy.get('name')}", "function": legacy}, f"{where}.function_call")]
    refusal = message.get("refusal")
    if refusal is not None:
        refusal = text(refusal, f"{where}.refusal")
    if "content" not in message and not calls and refusal is None:
        raise LineError(f"{where} has no \"content\"")
    content = message.get("content")
    if content is not None:
        content = text(content, f"{where}.content", allow_empty=bool(calls))
        if refusal is not None:
            raise LineError(f"{where} has both \"content\" and \"refusal\"; a refusal is the whole answer")
    elif refusal is not None:
        content = refusal
    elif not calls:
        raise LineError(f"{where}.content may be null only when the assistant calls tools")
    return Message(role="assistant", content=content, weight=weight, name=name, tool_calls=tuple(calls))


def conversation(obj: dict[str, Any], *, where: str = "messages", allowed: set[str]) -> Conversation:
    """`obj["messages"]` with the tools they may call, checked turn by turn: every call names a defined tool
    (when tools are given), every tool message answers an earlier call, and `parallel_tool_calls: false`
    allows one call per turn."""
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise LineError(f"unsupported key {unknown[0]!r}")
    raw = obj.get("messages")
    if not isinstance(raw, list) or not raw:
        raise LineError(f"\"{where}\" must be a non-empty list")
    tools = tools_of(obj)
    parallel = obj.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise LineError("\"parallel_tool_calls\" must be true or false")
    messages = tuple(_message(m, f"{where}[{i}]") for i, m in enumerate(raw))
    check_calls(messages, tools=tools, parallel=parallel, where=where)
    return Conversation(messages=messages, tools=tools, parallel_tool_calls=parallel)


def check_calls(messages: tuple[Message, ...], *, tools: tuple[dict[str, Any], ...], parallel: bool,
                where: str = "messages") -> None:
    defined = {t["function"]["name"] for t in tools}
    open_calls: dict[str, str] = {}
    for i, message in enumerate(messages):
        if message.tool_calls:
            if not parallel and len(message.tool_calls) > 1:
                raise LineError(f"{where}[{i}] makes {len(message.tool_calls)} tool calls but "
                                "\"parallel_tool_calls\" is false")
            for call in message.tool_calls:
                if defined and call.name not in defined:
                    raise LineError(f"{where}[{i}] calls {call.name!r}, which is not among the example's tools")
                open_calls[call.id] = call.name
        if message.role == "tool":
            if message.tool_call_id not in open_calls:
                raise LineError(f"{where}[{i}] answers tool call {message.tool_call_id!r}, which no earlier "
                                "assistant message made")
            open_calls.pop(message.tool_call_id)

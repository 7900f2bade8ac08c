"""OpenAI's Batch API files: the input lines (`/v1/chat/completions` requests with a `custom_id`), checked line by
line, and the output and error lines built from what a worker generated.

An input line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}`; the body is a
chat-completion request with the sampling parameters a worker honours (`max_tokens` or `max_completion_tokens`,
`temperature`, `top_p`, `stop`, `seed`, `n` = 1) and one `model` for the whole file. Fields a worker cannot honour
(tools, response formats, logprobs, streaming) are refused with the line's number, never silently dropped. The
output lines are OpenAI's: `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`,
their bodies `chat.completion` objects the coordinator writes from the worker's text and token counts.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from shared.errors import InvalidFile
from shared.messages import LineError, conversation

ENDPOINT = "/v1/chat/completions"
MAX_REQUESTS = 50_000  # OpenAI's limit per batch file
MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_CUSTOM_ID = 512
DEFAULT_MAX_TOKENS = 256  # a request that names no limit: a worker generates at most this many tokens
MAX_TOKENS = 8192
CUSTOM_ID = re.compile(r"^[\x20-\x7e]{1,512}$")  # printable ASCII, as the custom ids clients use
_BODY_KEYS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "n",
              "user", "metadata", "store"}
_UNSUPPORTED = {"tools": "tool calls", "tool_choice": "tool calls", "functions": "function calls",
                "function_call": "function calls", "response_format": "structured output", "logprobs": "log-probs",
                "top_logprobs": "log-probs", "stream": "streaming", "stream_options": "streaming",
                "logit_bias": "logit bias", "audio": "audio", "modalities": "audio", "prediction": "predicted output",
                "frequency_penalty": "frequency penalties", "presence_penalty": "presence penalties"}
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class Sampling:
    """How one request is generated (the worker groups requests that sample alike)."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None


@dataclass(frozen=True, slots=True)
class BatchRequest:
    line: int
    custom_id: str
    model: str
    messages: tuple[dict[str, Any], ...]  # as Hugging Face chat templates read them
    sampling: Sampling


@dataclass(frozen=True, slots=True)
class BatchSummary:
    requests: int
    model: str
    estimated_tokens: int  # prompts, by the same estimate datasets use, plus the most each answer may take


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer of hundreds of digits: no float holds it
        return False


def _number(body: dict[str, Any], key: str, low: float, high: float, default: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if type(value) not in (int, float) or not _finite(value) or not low <= value <= high:
        raise LineError(f"has body.{key} {value!r}; it must be a number from {low:g} to {high:g}")
    return float(value)


def _sampling(body: dict[str, Any]) -> Sampling:
    limits = [body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None]
    if len(limits) == 2 and limits[0] != limits[1]:
        raise LineError("gives both body.max_tokens and body.max_completion_tokens, with different values")
    limit = limits[0] if limits else DEFAULT_MAX_TOKENS
    if type(limit) is not int or not 1 <= limit <= MAX_TOKENS:
        raise LineError(f"has body.max_tokens {limit!r}; it must be a whole number from 1 to {MAX_TOKENS}")
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else () if stop is None else None
    if stops is None or len(stops) > MAX_STOP or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS
                                                         for s in stops):
        raise LineError(f"has body.stop that is not a string or a list of at most {MAX_STOP} strings of 1 to "
                        f"{MAX_STOP_CHARS} characters")
    seed = body.get("seed")
    if seed is not None and (type(seed) is not int or not 0 <= seed < 2**63):
        raise LineError("has body.seed that is not a whole number from 0 to 2^63 - 1")
    if body.get("n", 1) not in (1, None):
        raise LineError("has body.n other than 1; a batch line asks for one completion")
    return Sampling(max_tokens=limit, temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
                    top_p=_number(body, "top_p", 0.0, 1.0, 1.0), stop=stops, seed=seed)


def parse_request(raw: bytes, number: int) -> BatchRequest:
    """One input line; raises `LineError` with the reason (the caller adds the line number)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise LineError(f"is not valid UTF-8 (byte {exc.start})") from None
    except (ValueError, RecursionError):
        raise LineError("is not valid JSON") from None
    if not isinstance(obj, dict):
        raise LineError("must be a JSON object")
    unknown = set(obj) - {"custom_id", "method", "url", "body"}
    if unknown:
        raise LineError(f"has unknown field {sorted(unknown)[0]!r}")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not CUSTOM_ID.fullmatch(custom_id):
        raise LineError(f"needs a custom_id of 1 to {MAX_CUSTOM_ID} printable ASCII characters")
    if obj.get("method") != "POST":
        raise LineError('needs "method": "POST"')
    if obj.get("url") != ENDPOINT:
        raise LineError(f'needs "url": "{ENDPOINT}" (the only endpoint tunegrid batches)')
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineError("needs a body object (a chat completion request)")
    for key in body:
        if key in _UNSUPPORTED:
            raise LineError(f"asks for body.{key}: {_UNSUPPORTED[key]} are not supported in batches here")
        if key not in _BODY_KEYS:
            raise LineError(f"has unknown field body.{key}")
    model = body.get("model")
    if not isinstance(model, str) or not 0 < len(model) <= 240:
        raise LineError("needs body.model")
    chat = conversation({"messages": body.get("messages")}, where="body.messages", allowed={"messages"})
    if chat.uses_tools:
        raise LineError("holds tool calls or tool messages: tool calls are not supported in batches here")
    if chat.messages[-1].role == "assistant":
        raise LineError("needs body.messages to end with a message to answer, not the assistant's")
    return BatchRequest(line=number, custom_id=custom_id, model=model, sampling=_sampling(body),
                        messages=tuple(m.for_template() for m in chat.messages))


def iter_requests(lines: Any) -> Any:
    """(line number, request) of each non-blank input line; `InvalidFile` naming the first bad one, a repeated
    custom_id or a second model."""
    seen: set[str] = set()
    model: str | None = None
    count = 0
    for number, raw in enumerate(lines, start=1):
        if number == 1:
            raw = raw.removeprefix(UTF8_BOM)
        if not raw.strip():
            continue
        try:
            request = parse_request(raw.rstrip(b"\r\n"), number)
        except LineError as exc:
            raise InvalidFile(f"Line {number} {exc}.", param="file") from None
        if request.custom_id in seen:
            raise InvalidFile(f"Line {number} repeats custom_id {request.custom_id!r}; each request needs its own.",
                              param="file")
        if model is not None and request.model != model:
            raise InvalidFile(f"Line {number} asks for model {request.model!r}; the file's first request asks for "
                              f"{model!r}, and a batch runs one model.", param="file")
        count += 1
        if count > MAX_REQUESTS:
            raise InvalidFile(f"The file has more than {MAX_REQUESTS} requests.", param="file")
        seen.add(request.custom_id)
        model = request.model
        yield number, request


def validate_batch_file(lines: Any) -> BatchSummary:
    requests, tokens, model = 0, 0, ""
    for _, request in iter_requests(lines):
        requests += 1
        model = request.model
        tokens += sum(len(m.get("content") or "") // 4 + 4 for m in request.messages) + request.sampling.max_tokens
    if requests == 0:
        raise InvalidFile("The file has no requests; expected JSONL with one request per line.", param="file")
    return BatchSummary(requests=requests, model=model, estimated_tokens=tokens)


# --- what a worker reports, and the lines the coordinator writes ------------------------------------------

FINISH_REASONS = ("stop", "length")


def output_line(*, request_id: str, custom_id: str, completion_id: str, model: str, created: int, content: str,
                finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A success line of the output file, with its `chat.completion` body."""
    return {"id": request_id, "custom_id": custom_id, "error": None, "response": {
        "status_code": 200, "request_id": request_id, "body": {
            "id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None,
                                                 "annotations": []},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}}}


def error_line(*, request_id: str, custom_id: str, code: str, message: str) -> dict[str, Any]:
    """A line of the error file: the request could not be answered (OpenAI's shape: a response with a 4xx body)."""
    return {"id": request_id, "custom_id": custom_id, "response": {
        "status_code": 400, "request_id": request_id,
        "body": {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}},
        "error": None}

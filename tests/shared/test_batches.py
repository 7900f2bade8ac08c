"""OpenAI's Batch API input lines, checked line by line, and the output and error lines the coordinator writes."""

from __future__ import annotations

import json

import pytest

from shared.batches import MAX_TOKENS, error_line, iter_requests, output_line, validate_batch_file
from shared.errors import InvalidFile


def line(custom_id: str = "a", **body: object) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "tunegrid/tiny-llama", "messages": [{"role": "user", "content": "hi"}], **body}}).encode()


def test_a_request_keeps_its_sampling() -> None:
    [(_, request)] = list(iter_requests([line(max_completion_tokens=9, temperature=0, top_p=0.5, stop="\n", seed=3)]))
    assert request.custom_id == "a" and request.model == "tunegrid/tiny-llama"
    assert request.messages == ({"role": "user", "content": "hi"},)
    s = request.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.stop, s.seed) == (9, 0.0, 0.5, ("\n",), 3)
    [(_, default)] = list(iter_requests([line()]))
    assert (default.sampling.max_tokens, default.sampling.temperature, default.sampling.stop) == (256, 1.0, ())


BAD = {
    "not json": (b"{", "not valid JSON"),
    "no custom_id": (json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}).encode(), "custom_id"),
    "GET": (json.dumps({"custom_id": "a", "method": "GET", "url": "/v1/chat/completions", "body": {}}).encode(),
            '"method": "POST"'),
    "another endpoint": (json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}).encode(),
                         "only endpoint"),
    "tools": (line(tools=[]), "tool calls are not supported"),
    "streaming": (line(stream=True), "streaming"),
    "unknown body key": (line(colour="red"), "unknown field body.colour"),
    "hot": (line(temperature=3), "temperature"),
    "NaN": (line(temperature=float("nan")), "temperature"),
    "n": (line(n=2), "body.n"),
    "huge max_tokens": (line(max_tokens=MAX_TOKENS + 1), "max_tokens"),
    "two limits": (line(max_tokens=5, max_completion_tokens=6), "different values"),
    "bad stop": (line(stop=["a", 1]), "stop"),
    "too many stops": (line(stop=["a", "b", "c", "d", "e"]), "stop"),
    "negative seed": (line(seed=-1), "seed"),
    "ends with the assistant": (line(messages=[{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "yo"}]), "not the assistant's"),
    "no messages": (line(messages=[]), "non-empty list"),
}


@pytest.mark.parametrize("raw, match", list(BAD.values()), ids=list(BAD))
def test_a_bad_line_is_refused_naming_it(raw: bytes, match: str) -> None:
    with pytest.raises(InvalidFile, match=match) as refused:
        validate_batch_file([line("ok"), raw])
    assert refused.value.message.startswith("Line 2 ")


def test_a_file_is_one_model_and_each_custom_id_once() -> None:
    with pytest.raises(InvalidFile, match="repeats custom_id 'a'"):
        validate_batch_file([line("a"), line("a")])
    with pytest.raises(InvalidFile, match="a batch runs one model"):
        validate_batch_file([line("a"), line("b", model="ft:other")])
    with pytest.raises(InvalidFile, match="no requests"):
        validate_batch_file([b"\n"])
    summary = validate_batch_file([b"\xef\xbb\xbf" + line("a", max_tokens=10), b"", line("b", max_tokens=20)])
    assert (summary.requests, summary.model) == (2, "tunegrid/tiny-llama") and summary.estimated_tokens > 30


def test_output_and_error_lines_are_openais() -> None:
    out = output_line(request_id="batch_req_1", custom_id="a", completion_id="chatcmpl-1", model="m", created=5,
                      content="4", finish_reason="stop", prompt_tokens=7, completion_tokens=2)
    body = out["response"]["body"]
    assert out["error"] is None and out["response"]["status_code"] == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "4", "refusal": None, "annotations": []}
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    err = error_line(request_id="batch_req_2", custom_id="b", code="context_length_exceeded", message="too long")
    assert err["response"]["status_code"] == 400 and err["response"]["body"]["error"]["code"] == "context_length_exceeded"

"""Request ids (coordinator/request_ids.py): every answer carries `x-request-id`, refusals included, and the
`openai` client reads it; a client's own sane id is kept; every log line a request causes carries its id, a
service's line in a worker thread too; logs are JSON objects in production and text embedded."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from coordinator.request_ids import JsonFormatter, RequestIdFilter, configure_logging
from coordinator.settings import CoordinatorSettings
from tests.conftest import chat_lines, jsonl


class Lines(logging.Handler):
    """What a log pipeline would receive: each record formatted as JSON, with its request id."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(RequestIdFilter())
        self.setFormatter(JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def log_lines() -> Iterator[list[dict]]:
    handler, root = Lines(), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield handler.lines
    root.removeHandler(handler)
    root.setLevel(level)


def test_every_answer_carries_an_id_refusals_included(client: TestClient, make_caller) -> None:  # type: ignore[no-untyped-def]
    alice = make_caller("customer", "alice")
    answers = [
        client.get("/v1/files", headers=alice.headers),  # 200
        client.get("/v1/files/file-missing", headers=alice.headers),  # 404 from a service
        client.get("/v1/files", headers={"Authorization": "Bearer tg_wrong"}),  # 401
        client.post("/v1/fine_tuning/jobs", headers={**alice.headers, "Content-Length": str(10**9)},
                    content=b"{}"),  # 413 from the size limit, before any route
        client.get("/healthz"),
    ]
    assert [a.status_code for a in answers] == [200, 404, 401, 413, 200]
    ids = [a.headers["x-request-id"] for a in answers]
    assert all(i.startswith("req_") and len(i) == 36 for i in ids) and len(set(ids)) == len(ids)


def test_a_clients_own_id_is_kept_when_it_looks_like_one(client: TestClient) -> None:
    assert client.get("/healthz", headers={"x-request-id": "lb-7f3a9c01:retry-2"}).headers["x-request-id"] == \
        "lb-7f3a9c01:retry-2"
    for odd in ("short", "x" * 129, "has space 12345", "<script>alert(1)</script>", "ünïcode-12345"):
        answered = client.get("/healthz", headers={"x-request-id": odd.encode("utf-8")})
        assert answered.headers["x-request-id"].startswith("req_"), odd
    # Exactly one header, ours, whatever a route might have set.
    assert len(client.get("/healthz").headers.get_list("x-request-id")) == 1


def test_the_openai_client_reads_the_id(client: TestClient, make_caller) -> None:  # type: ignore[no-untyped-def]
    openai = OpenAI(base_url="http://testserver/v1", api_key=make_caller("customer", "alice").key,
                    http_client=client, max_retries=0)
    uploaded = openai.files.create(file=("train.jsonl", io.BytesIO(jsonl(chat_lines(12)))), purpose="fine-tune")
    assert uploaded._request_id and uploaded._request_id.startswith("req_")  # noqa: SLF001 - the client's field


def test_a_requests_log_lines_carry_its_id_a_services_too(client: TestClient, make_caller, log_lines,  # type: ignore[no-untyped-def]
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator.services import files  # noqa: PLC0415

    original = files.list_files

    def logging_list(*args, **kwargs):  # type: ignore[no-untyped-def]
        logging.getLogger("coordinator.services.files").info("listing", extra={"rows_asked": kwargs["limit"]})
        return original(*args, **kwargs)

    monkeypatch.setattr(files, "list_files", logging_list)  # the service runs in a worker thread
    answered = client.get("/v1/files?limit=5", headers=make_caller("customer", "alice").headers)
    request_id = answered.headers["x-request-id"]
    mine = [line for line in log_lines if line["request_id"] == request_id]
    service = next(line for line in mine if line["logger"] == "coordinator.services.files")
    assert service["message"] == "listing" and service["rows_asked"] == 5
    access = next(line for line in mine if line["logger"] == "tunegrid.access")
    assert access["route"] == "/v1/files" and access["status"] == 200 and access["method"] == "GET"
    assert access["duration_ms"] >= 0 and access["time"].endswith("Z")
    assert access["bytes_in"] == 0 and access["bytes_out"] == len(answered.content)  # body bytes each way
    outside = logging.getLogger("tunegrid.test")
    outside.info("no request here")
    assert log_lines[-1]["request_id"] == "-"


def test_an_access_line_names_the_route_not_the_ids_in_the_path(client: TestClient, make_caller,  # type: ignore[no-untyped-def]
                                                                  log_lines) -> None:
    answered = client.get("/v1/files/file-secretlooking123", headers=make_caller("customer", "alice").headers)
    line = next(entry for entry in log_lines if entry["request_id"] == answered.headers["x-request-id"]
                and entry["logger"] == "tunegrid.access")
    assert line["route"] == "/v1/files/{file_id}" and line["status"] == 404


@pytest.mark.parametrize(("fields", "json_lines"), [({}, False), ({"redis_url": "redis://127.0.0.1:6379/0"}, True),
                                                    ({"log_format": "json"}, True),
                                                    ({"redis_url": "redis://x", "log_format": "text"}, False)])
def test_logs_are_json_in_production_and_text_embedded(fields: dict, json_lines: bool,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    settings = CoordinatorSettings(**fields)
    assert settings.json_logs is json_lines
    configure_logging(json_lines=settings.json_logs)
    configure_logging(json_lines=settings.json_logs)  # idempotent: one handler, one line
    try:
        logging.getLogger("tunegrid.test").warning("disk %s", "low", extra={"free_bytes": 12})
        logging.getLogger("sqlalchemy.engine.Engine").info("SELECT 1")  # a library's chatter stays out
        written = capsys.readouterr().err.strip().splitlines()
        assert len(written) == 1
        if json_lines:
            entry = json.loads(written[0])
            assert entry["message"] == "disk low" and entry["free_bytes"] == 12 and entry["request_id"] == "-"
            assert entry["level"] == "warning" and entry["logger"] == "tunegrid.test"
        else:
            assert written[0].endswith("WARNING tunegrid.test [-] disk low")
    finally:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "tunegrid", False)]:
            root.removeHandler(handler)

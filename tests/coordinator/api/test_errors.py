"""Errors everywhere use OpenAI's envelope: auth, unknown routes, methods, bodies too large, crashes."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.conftest import Caller

ENVELOPE_KEYS = {"message", "type", "param", "code"}


def _assert_envelope(response, status: int) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ENVELOPE_KEYS
    return body["error"]


@pytest.mark.parametrize("path", ["/v1/files", "/v1/fine_tuning/jobs", "/v1/models", "/v1/models/gemma-2-2b-it",
                                  "/v1/fine_tuning/jobs/ftjob-x/events"])
@pytest.mark.parametrize("header", [None, "Bearer", "Bearer tg_nope", "Basic dXNlcjpwYXNz", "tg_abc"])
def test_every_v1_route_requires_a_bearer_key(client: TestClient, path: str, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    error = _assert_envelope(client.get(path, headers=headers), 401)
    assert error["type"] == "authentication_error"


def test_every_v1_route_declares_bearer_security(app: FastAPI) -> None:
    spec = app.openapi()
    for path, operations in spec["paths"].items():
        if path.startswith("/v1"):
            for operation in operations.values():
                assert operation.get("security"), f"{path} has no security requirement"


def test_unknown_route_and_wrong_method(client: TestClient, customer: Caller) -> None:
    assert _assert_envelope(client.get("/v1/nope", headers=customer.headers), 404)["code"] == "not_found"
    assert _assert_envelope(client.put("/v1/files", headers=customer.headers), 405)["code"] == "method_not_allowed"


def test_json_body_over_the_limit_is_413(client: TestClient, customer: Caller) -> None:
    body = b'{"model": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    response = client.post("/v1/fine_tuning/jobs", headers={**customer.headers, "content-type": "application/json"},
                           content=body)
    _assert_envelope(response, 413)


def test_unexpected_crash_is_a_500_envelope_not_a_traceback(app: FastAPI, customer: Caller) -> None:
    @app.get("/v1/boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    with TestClient(app, raise_server_exceptions=False) as client:
        error = _assert_envelope(client.get("/v1/boom"), 500)
    assert error["type"] == "server_error" and "secret" not in error["message"]


def test_models_lists_catalog_and_retrieves_by_id_with_a_slash(client: TestClient, customer: Caller) -> None:
    models = client.get("/v1/models", headers=customer.headers).json()
    ids = [m["id"] for m in models["data"]]
    assert "tunegrid/tiny-llama" in ids and "llama-3.1-8b-instruct" in ids
    tiny = client.get("/v1/models/tunegrid/tiny-llama", headers=customer.headers).json()
    assert tiny["object"] == "model" and tiny["owned_by"] == "tunegrid" and tiny["kind"] == "base"
    assert _assert_envelope(client.get("/v1/models/gpt-9", headers=customer.headers), 404)["code"] == "model_not_found"


@pytest.mark.parametrize("query", ["limt=5", "after=a&after=b", "metadata[x]=1&metadata[x]=2"])
def test_unknown_or_repeated_query_parameters_are_refused(client: TestClient, customer: Caller, query: str) -> None:
    error = _assert_envelope(client.get(f"/v1/fine_tuning/jobs?{query}", headers=customer.headers), 400)
    assert error["code"] in ("unknown_parameter", "duplicate_parameter")


def test_nul_characters_are_a_400_not_a_database_error(client: TestClient, customer: Caller) -> None:
    for response in (
        client.get("/v1/files?after=%00", headers=customer.headers),
        client.get("/v1/files/file-%00", headers=customer.headers),
        client.get("/v1/models/x%00y", headers=customer.headers),
        client.post("/v1/fine_tuning/jobs", headers=customer.headers,
                    json={"model": "tunegrid/tiny-llama", "training_file": "file-\x00"}),
        client.post("/v1/fine_tuning/jobs", headers=customer.headers,
                    json={"model": "tunegrid/tiny-llama", "training_file": "f", "metadata": {"k\x00": "v"}}),
    ):
        _assert_envelope(response, 400)


def test_metadata_filters_belong_to_the_job_list_only(client: TestClient, customer: Caller, create_job) -> None:  # type: ignore[no-untyped-def]
    job_id = create_job().json()["id"]
    assert client.get("/v1/fine_tuning/jobs?metadata[a]=b", headers=customer.headers).status_code == 200
    response = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?metadata[a]=b", headers=customer.headers)
    assert _assert_envelope(response, 400)["code"] == "unknown_parameter"


def test_a_bad_key_or_role_is_reported_before_what_is_wrong_with_the_request(client: TestClient, make_caller) -> None:  # type: ignore[no-untyped-def]
    provider = make_caller("provider", "gpu-owner")
    bad_body = {"model": "tunegrid/tiny-llama", "training_file": "f", "lora": {"r": 0}}
    wrong_key = {"Authorization": "Bearer tg_000000000000_nope"}
    assert client.post("/v1/fine_tuning/jobs", headers=wrong_key, json=bad_body).status_code == 401
    assert client.post("/v1/fine_tuning/jobs", headers=provider.headers, json=bad_body).status_code == 403
    upload = client.post("/v1/files", headers=wrong_key,
                         data={"purpose": "fine-tune", "expires_after[anchor]": "never"},
                         files={"file": ("a.jsonl", b"{}")})
    assert upload.status_code == 401
    assert client.get("/v1/files/file-missing", headers=wrong_key).status_code == 401

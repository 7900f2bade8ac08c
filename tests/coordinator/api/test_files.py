"""`/v1/files`: upload with validation, list with paging, retrieve, content, delete, and who may see what."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from tests.conftest import Caller, chat_lines, jsonl


def _error(response) -> dict:  # type: ignore[no-untyped-def]
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_upload_validates_and_counts(upload, customer: Caller, client: TestClient) -> None:  # type: ignore[no-untyped-def]
    content = jsonl(chat_lines(12))
    response = upload(customer, content)
    assert response.status_code == 200, response.text
    file = response.json()
    assert file["object"] == "file" and file["id"].startswith("file-")
    assert file["bytes"] == len(content) and file["status"] == "processed" and file["purpose"] == "fine-tune"
    assert file["examples"] == 12 and file["format"] == "chat" and file["estimated_tokens"] > 0
    assert file["expires_at"] > file["created_at"] and file["filename"] == "train.jsonl"

    got = client.get(f"/v1/files/{file['id']}", headers=customer.headers)
    assert got.json() == file
    assert client.get(f"/v1/files/{file['id']}/content", headers=customer.headers).content == content


def test_bad_dataset_is_rejected_with_line_and_nothing_is_kept(upload, customer: Caller, client: TestClient, settings) -> None:  # type: ignore[no-untyped-def]
    lines = chat_lines(12)
    lines[4] = '{"messages": [{"role": "user", "content": "hi"}]}'
    response = upload(customer, jsonl(lines))
    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "invalid_file" and error["param"] == "file"
    assert error["message"].startswith("Line 5 ") and "assistant" in error["message"]
    assert client.get("/v1/files", headers=customer.headers).json()["data"] == []
    stored = [p for p in settings.resolved_storage_dir.rglob("*") if p.is_file()]
    assert stored == []


def test_non_utf8_and_too_few_examples(upload, customer: Caller) -> None:  # type: ignore[no-untyped-def]
    latin1 = jsonl(chat_lines(3)) + '{"prompt": "café"}\n'.encode("latin-1")
    assert "Line 4 is not valid UTF-8" in _error(upload(customer, latin1))["message"]
    assert "at least 10" in _error(upload(customer, jsonl(chat_lines(4))))["message"]


def test_over_the_size_limit_is_413(upload, customer: Caller, settings, client: TestClient) -> None:  # type: ignore[no-untyped-def]
    line = json.dumps({"prompt": "x" * 1000, "completion": "y"})
    big = jsonl([line] * (settings.max_upload_bytes // len(line) + 2))
    response = upload(customer, big)
    assert response.status_code == 413
    assert _error(response)["code"] == "payload_too_large"
    assert client.get("/v1/files", headers=customer.headers).json()["data"] == []


def test_body_far_over_the_limit_is_refused_before_reading(customer: Caller, client: TestClient, settings) -> None:  # type: ignore[no-untyped-def]
    huge = b"x" * (settings.max_upload_bytes * 4)
    response = client.post("/v1/files", headers=customer.headers, data={"purpose": "fine-tune"},
                           files={"file": ("big.jsonl", huge)})
    assert response.status_code == 413


def test_wrong_purpose_and_missing_parts(upload, customer: Caller, client: TestClient) -> None:  # type: ignore[no-untyped-def]
    error = _error(upload(customer, purpose="assistants"))
    assert error["param"] == "purpose"
    missing_file = client.post("/v1/files", headers=customer.headers, data={"purpose": "fine-tune"})
    assert missing_file.status_code == 400 and _error(missing_file)["param"] == "file"
    missing_purpose = client.post("/v1/files", headers=customer.headers, files={"file": ("a.jsonl", b"{}")})
    assert missing_purpose.status_code == 400 and _error(missing_purpose)["param"] == "purpose"
    not_multipart = client.post("/v1/files", headers=customer.headers, json={"purpose": "fine-tune"})
    assert not_multipart.status_code == 400


def test_list_pages_newest_first(upload, customer: Caller, client: TestClient) -> None:  # type: ignore[no-untyped-def]
    ids = [upload(customer).json()["id"] for _ in range(5)]
    first = client.get("/v1/files?limit=2", headers=customer.headers).json()
    assert [f["id"] for f in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    assert first["first_id"] == ids[4] and first["last_id"] == ids[3]
    rest = client.get(f"/v1/files?limit=10&after={first['last_id']}", headers=customer.headers).json()
    assert [f["id"] for f in rest["data"]] == ids[::-1][2:] and rest["has_more"] is False
    ascending = client.get("/v1/files?order=asc", headers=customer.headers).json()
    assert [f["id"] for f in ascending["data"]] == ids


def test_someone_elses_file_is_a_404_like_a_missing_one(upload, customer: Caller, other_customer: Caller, client: TestClient) -> None:  # type: ignore[no-untyped-def]
    file_id = upload(customer).json()["id"]
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        theirs = client.get(path, headers=other_customer.headers)
        missing = client.get(path.replace(file_id, "file-missing"), headers=other_customer.headers)
        assert theirs.status_code == missing.status_code == 404
        assert _error(theirs)["message"].replace(file_id, "X") == _error(missing)["message"].replace("file-missing", "X")
    assert client.delete(f"/v1/files/{file_id}", headers=other_customer.headers).status_code == 404
    assert client.get("/v1/files", headers=other_customer.headers).json()["data"] == []


def test_delete_removes_content_but_not_while_a_job_uses_it(upload, customer: Caller, client: TestClient, settings) -> None:  # type: ignore[no-untyped-def]
    file_id = upload(customer).json()["id"]
    job = client.post("/v1/fine_tuning/jobs", headers=customer.headers,
                      json={"model": "tunegrid/tiny-llama", "training_file": file_id}).json()
    in_use = client.delete(f"/v1/files/{file_id}", headers=customer.headers)
    assert in_use.status_code == 409 and _error(in_use)["code"] == "file_in_use"
    client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=customer.headers)
    deleted = client.delete(f"/v1/files/{file_id}", headers=customer.headers)
    assert deleted.json() == {"id": file_id, "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{file_id}", headers=customer.headers).status_code == 404
    assert not (settings.resolved_storage_dir / "files" / file_id).exists()
    # The job still names its training file.
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=customer.headers).json()["training_file"] == file_id


def test_provider_keys_cannot_use_customer_routes(upload, make_caller) -> None:  # type: ignore[no-untyped-def]
    provider = make_caller("provider", "gpu-owner")
    response = upload(provider)
    assert response.status_code == 403 and _error(response)["type"] == "permission_error"


def test_chunked_upload_over_the_limit_is_413_too(customer: Caller, client: TestClient, settings) -> None:  # type: ignore[no-untyped-def]
    boundary = "tunegridboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n").encode()
    body += b"x" * (settings.max_upload_bytes * 2) + f"\r\n--{boundary}--\r\n".encode()

    def chunks():  # no Content-Length: the size is only known while reading
        for start in range(0, len(body), 8192):
            yield body[start:start + 8192]

    response = client.post("/v1/files", content=chunks(),
                           headers={**customer.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


def test_expires_after_is_honoured_to_the_second_and_expired_files_are_gone(
        customer: Caller, client: TestClient, session) -> None:  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from coordinator.db.tables import FileModel, utcnow

    response = client.post("/v1/files", headers=customer.headers,
                           data={"purpose": "fine-tune", "expires_after[anchor]": "created_at",
                                 "expires_after[seconds]": "3600"},
                           files={"file": ("t.jsonl", jsonl(chat_lines()))})
    file = response.json()
    assert file["expires_at"] - file["created_at"] == 3600
    row = session.get(FileModel, file["id"])
    row.expires_at = utcnow() - timedelta(seconds=1)
    session.commit()
    assert client.get(f"/v1/files/{file['id']}", headers=customer.headers).status_code == 404
    assert client.get("/v1/files", headers=customer.headers).json()["data"] == []
    job = client.post("/v1/fine_tuning/jobs", headers=customer.headers,
                      json={"model": "tunegrid/tiny-llama", "training_file": file["id"]})
    assert job.status_code == 400 and job.json()["error"]["code"] == "file_not_found"


def test_content_whose_blob_vanished_is_a_404_not_a_crash(upload, customer: Caller, client: TestClient, settings) -> None:  # type: ignore[no-untyped-def]
    file_id = upload(customer).json()["id"]
    (settings.resolved_storage_dir / "files" / file_id).unlink()
    assert client.get(f"/v1/files/{file_id}/content", headers=customer.headers).status_code == 404


def test_dataset_with_an_unpaired_surrogate_is_a_400_and_nothing_is_kept(upload, customer: Caller, settings) -> None:  # type: ignore[no-untyped-def]
    lines = chat_lines(10) + ['{"messages": [{"role": "assistant", "content": "\\ud800"}]}']
    response = upload(customer, jsonl(lines))
    assert response.status_code == 400 and "Line 11" in response.json()["error"]["message"]
    assert [p for p in settings.resolved_storage_dir.rglob("*") if p.is_file()] == []

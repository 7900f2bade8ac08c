"""`/v1/fine_tuning/jobs/{id}/exports` over HTTP, and an export lease's upload route: the shapes, the 4xx for what a
client or a worker sends wrong, and a download of the result through `/v1/files/{id}/content`."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from shared.protocol import SHA256_HEADER
from tests.conftest import Caller
from tests.coordinator.api.conftest import placed
from tests.fakes import FakeAgent, gguf_file, sha256


def _error(response) -> dict:  # type: ignore[no-untyped-def, type-arg]
    assert 400 <= response.status_code < 500, response.text
    return response.json()["error"]


def _succeeded(client: TestClient, agent: FakeAgent, create_job, **fields) -> dict:  # type: ignore[no-untyped-def, type-arg]
    job, assignment = placed(client, agent, create_job, **fields)
    assert agent.finish(assignment["lease_id"]).status_code == 200
    return job


def test_an_export_is_requested_listed_and_its_file_downloaded(client: TestClient, customer: Caller,  # type: ignore[no-untyped-def]
                                                               agent: FakeAgent, create_job, tmp_path: Path) -> None:
    job = _succeeded(client, agent, create_job)
    base = f"/v1/fine_tuning/jobs/{job['id']}/exports"
    created = client.post(base, json={"formats": ["gguf:q8_0"]}, headers=customer.headers)
    assert created.status_code == 200, created.text
    export = created.json()
    assert export["object"] == "fine_tuning.job.export" and export["status"] == "queued"
    assert export["fine_tuning_job_id"] == job["id"] and export["formats"] == ["gguf:q8_0"] and export["files"] == []
    assert float(export["cost_held"]) > 0 and export["cost"] == "0.000000"
    listed = client.get(base, headers=customer.headers).json()
    assert listed["object"] == "list" and [e["id"] for e in listed["data"]] == [export["id"]]
    assert client.get(f"/v1/fine_tuning/jobs/{export['id']}", headers=customer.headers).status_code == 404

    assignment = agent.claim(kinds=["train", "verify", "export"])
    assert assignment is not None and assignment["kind"] == "export" and assignment["training_file_url"] is None
    lease = assignment["lease_id"]
    data = gguf_file(tmp_path / "m.gguf").read_bytes()
    url = f"/v1/workers/leases/{lease}/exports/gguf:q8_0"
    wrong = client.put(url, content=data, headers={**agent.headers(lease), SHA256_HEADER: "0" * 64})
    assert wrong.status_code == 400 and _error(wrong)["code"] == "sha256_mismatch"
    assert _error(client.put(f"/v1/workers/leases/{lease}/exports/gguf:q2_k", content=data,
                             headers={**agent.headers(lease), SHA256_HEADER: sha256(data)}))
    stored = client.put(url, content=data, headers={**agent.headers(lease), SHA256_HEADER: sha256(data)})
    assert stored.status_code == 200 and stored.json()["format"] == "gguf:q8_0" and stored.json()["bytes"] == len(data)
    done = client.post(f"/v1/workers/leases/{lease}/complete", headers=agent.headers(lease),
                       json={"export": {"gguf:q8_0": {"seconds": 1.5, "bytes": len(data)}},
                             "usage": {"wall_seconds": 3, "gpu_seconds": 3}})
    assert done.status_code == 200 and done.json()["job_status"] == "succeeded", done.text
    export = client.get(f"{base}/{export['id']}", headers=customer.headers).json()
    files = {f["format"]: f for f in export["files"]}
    gguf = client.get(f"/v1/files/{files['gguf:q8_0']['file_id']}/content", headers=customer.headers)
    assert gguf.status_code == 200 and gguf.content == data
    modelfile = client.get(f"/v1/files/{files['modelfile:gguf:q8_0']['file_id']}/content", headers=customer.headers)
    assert modelfile.text.splitlines()[2] == f"FROM ./{files['gguf:q8_0']['filename']}"


def test_bad_export_requests_are_clear_4xx(client: TestClient, customer: Caller, make_caller,  # type: ignore[no-untyped-def]
                                           agent: FakeAgent, create_job) -> None:
    job = _succeeded(client, agent, create_job)
    base = f"/v1/fine_tuning/jobs/{job['id']}/exports"
    for body, param in (({"formats": []}, "formats"), ({"formats": ["onnx"]}, "formats.0"),
                        ({"formats": ["merged"], "colour": "red"}, "colour"),
                        ({"formats": ["merged"], "max_cost": "0.0000001"}, "max_cost")):
        error = _error(client.post(base, json=body, headers=customer.headers))
        assert error["param"] == param, (body, error)
    missing = _error(client.post(base, json={"formats": ["merged"], "checkpoint": "ftckpt-x"}, headers=customer.headers))
    assert missing["code"] == "checkpoint_not_found"
    bob = make_caller("customer", "bob")
    assert client.post(base, json={"formats": ["merged"]}, headers=bob.headers).status_code == 404
    assert client.get(f"{base}/ftexp-nope", headers=customer.headers).status_code == 404
    error = _error(create_job(export=["gguf:q2_k"]))
    assert error["param"] == "export.0"

"""Every customer-API response validates against OpenAI's published schemas (vendored in tests/contracts).

Our extensions are extra properties (allowed by those schemas) and the job status `paused`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from sqlalchemy.orm import Session

from coordinator.db.tables import JobCheckpointModel
from tests.conftest import Caller

SPEC_PATH = Path(__file__).resolve().parents[2] / "contracts" / "openai" / "openapi-fine-tuning.json"


def _numeric_exclusive_bounds(node: object) -> None:
    """OpenAI writes OpenAPI 3.0's boolean `exclusiveMinimum: true` beside `minimum`; JSON Schema 2020-12 reads a
    boolean there as the number 1 (so `beta: 0.25` would fail). Rewrite it as 2020-12 says it: the bound itself."""
    if isinstance(node, dict):
        for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if node.get(key) is True and bound in node:
                node[key] = node.pop(bound)
            elif node.get(key) is False:
                node.pop(key)
        for value in node.values():
            _numeric_exclusive_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _numeric_exclusive_bounds(value)


@pytest.fixture(scope="module")
def validator_for():  # type: ignore[no-untyped-def]
    spec = json.loads(SPEC_PATH.read_text())
    spec = copy.deepcopy(spec)
    _numeric_exclusive_bounds(spec)
    status = spec["components"]["schemas"]["FineTuningJob"]["properties"]["status"]
    status["enum"] = [*status["enum"], "paused"]  # our extension: paused jobs
    registry = Registry().with_resource("spec.json", DRAFT202012.create_resource(spec))

    def validator(name: str) -> Draft202012Validator:
        return Draft202012Validator({"$ref": f"spec.json#/components/schemas/{name}"}, registry=registry)

    return validator


def _valid(validator_for, schema: str, body: dict) -> None:  # type: ignore[no-untyped-def]
    errors = sorted(validator_for(schema).iter_errors(body), key=str)
    assert not errors, f"{schema}: " + "; ".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])


def test_files_responses(validator_for, client: TestClient, customer: Caller, upload) -> None:  # type: ignore[no-untyped-def]
    _valid(validator_for, "ListFilesResponse", client.get("/v1/files", headers=customer.headers).json())
    file = upload(customer).json()
    _valid(validator_for, "OpenAIFile", file)
    _valid(validator_for, "OpenAIFile", client.get(f"/v1/files/{file['id']}", headers=customer.headers).json())
    _valid(validator_for, "ListFilesResponse", client.get("/v1/files", headers=customer.headers).json())
    _valid(validator_for, "DeleteFileResponse",
           client.delete(f"/v1/files/{file['id']}", headers=customer.headers).json())


def test_job_responses_in_every_state(validator_for, client: TestClient, customer: Caller, create_job,  # type: ignore[no-untyped-def]
                                      session: Session) -> None:
    job = create_job(metadata={"a": "b"}, lora={"r": 4}).json()
    _valid(validator_for, "FineTuningJob", job)
    url = f"/v1/fine_tuning/jobs/{job['id']}"
    for action in ("pause", "resume", "cancel"):
        _valid(validator_for, "FineTuningJob", client.post(f"{url}/{action}", headers=customer.headers).json())
    _valid(validator_for, "FineTuningJob", client.get(url, headers=customer.headers).json())
    _valid(validator_for, "ListPaginatedFineTuningJobsResponse",
           client.get("/v1/fine_tuning/jobs", headers=customer.headers).json())
    _valid(validator_for, "ListFineTuningJobEventsResponse", client.get(f"{url}/events", headers=customer.headers).json())
    session.add(JobCheckpointModel(
        id="ftckpt_1", job_id=job["id"], step_number=10, metrics={"step": 10, "train_loss": 1.5},
        fine_tuned_model_checkpoint=f"ft:tunegrid/tiny-llama:{job['id']}:ckpt-step-10",
    ))
    session.commit()
    checkpoints = client.get(f"{url}/checkpoints", headers=customer.headers).json()
    assert checkpoints["data"][0]["step_number"] == 10
    _valid(validator_for, "ListFineTuningJobCheckpointsResponse", checkpoints)


def test_model_and_error_responses(validator_for, client: TestClient, customer: Caller) -> None:  # type: ignore[no-untyped-def]
    _valid(validator_for, "ListModelsResponse", client.get("/v1/models", headers=customer.headers).json())
    _valid(validator_for, "Model", client.get("/v1/models/qwen2.5-7b-instruct", headers=customer.headers).json())
    for response in (client.get("/v1/files"), client.get("/v1/files/file-x", headers=customer.headers),
                     client.post("/v1/fine_tuning/jobs", headers=customer.headers, json={})):
        assert response.status_code in (400, 401, 404)
        _valid(validator_for, "ErrorResponse", response.json())


def test_the_validator_can_fail(validator_for) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AssertionError):
        _valid(validator_for, "OpenAIFile", {"id": "file-1", "object": "file", "bytes": "many"})
    with pytest.raises(AssertionError):
        _valid(validator_for, "FineTuningJob", {"id": "ftjob-1", "object": "fine_tuning.job", "status": "dreaming"})


def test_a_dpo_job_with_early_stopping_validates(validator_for, client: TestClient, customer: Caller, upload) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import jsonl, preference_lines  # noqa: PLC0415

    pairs = upload(customer, jsonl(preference_lines(24))).json()
    assert pairs["status"] == "processed"
    response = client.post("/v1/fine_tuning/jobs", headers=customer.headers, json={
        "model": "tunegrid/tiny-llama", "training_file": pairs["id"], "early_stopping": {"patience": 2},
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25}}}})
    assert response.status_code == 200, response.text
    job = response.json()
    _valid(validator_for, "FineTuningJob", job)
    assert job["method"] == {"type": "dpo", "dpo": {"hyperparameters": {
        "batch_size": "auto", "learning_rate_multiplier": "auto", "n_epochs": 3, "beta": 0.25}}}
    assert job["early_stopping"] == {"patience": 2, "best_step": None, "stopped_early": None, "reason": None}


def test_batch_responses_and_output_lines(validator_for, client: TestClient, customer: Caller, make_caller) -> None:  # type: ignore[no-untyped-def]
    """A batch through HTTP, answered by a worker speaking the protocol: the batch in each state, the list, its
    files, and each output line's body (a chat completion) against OpenAI's schemas."""
    import hashlib  # noqa: PLC0415
    import json as _json  # noqa: PLC0415

    from shared.protocol import SHA256_HEADER  # noqa: PLC0415
    from tests.fakes import FakeAgent, batch_answer, batch_lines  # noqa: PLC0415

    file = client.post("/v1/files", headers=customer.headers, data={"purpose": "batch"},
                       files={"file": ("batch.jsonl", batch_lines(3))}).json()
    _valid(validator_for, "OpenAIFile", file)
    created = client.post("/v1/batches", headers=customer.headers, json={
        "input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    assert created.status_code == 200, created.text
    _valid(validator_for, "Batch", created.json())
    agent = FakeAgent.register(client, make_caller("provider", "pat").key)
    a = agent.claim(kinds=["train", "verify", "export", "batch"])
    assert a is not None and a["kind"] == "batch"
    agent.events(a["lease_id"], {"type": "started", "total_steps": 3, "message": "Batch started"})
    part = "".join(_json.dumps(batch_answer(f"req-{i}", f"answer {i}")) + "\n" for i in range(3)).encode()
    sent = client.put(f"/v1/workers/leases/{a['lease_id']}/batch_results", content=part,
                      headers={**agent.headers(a["lease_id"]), SHA256_HEADER: hashlib.sha256(part).hexdigest()})
    assert sent.status_code == 200 and sent.json()["recorded"] == 3, sent.text
    running = client.get(f"/v1/batches/{created.json()['id']}", headers=customer.headers).json()
    _valid(validator_for, "Batch", running)
    assert running["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    done = client.post(f"/v1/workers/leases/{a['lease_id']}/complete", headers=agent.headers(a["lease_id"]),
                       json={"usage": {"wall_seconds": 3, "gpu_seconds": 3}})
    assert done.status_code == 200 and done.json()["job_status"] == "succeeded", done.text
    batch = client.get(f"/v1/batches/{created.json()['id']}", headers=customer.headers).json()
    _valid(validator_for, "Batch", batch)
    assert batch["status"] == "completed" and batch["usage"]["total_tokens"] == 66
    _valid(validator_for, "ListBatchesResponse", client.get("/v1/batches", headers=customer.headers).json())
    output = client.get(f"/v1/files/{batch['output_file_id']}", headers=customer.headers).json()
    _valid(validator_for, "OpenAIFile", output)
    lines = client.get(f"/v1/files/{batch['output_file_id']}/content", headers=customer.headers).text.splitlines()
    for raw in lines:
        _valid(validator_for, "CreateChatCompletionResponse", _json.loads(raw)["response"]["body"])

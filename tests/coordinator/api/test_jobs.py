"""`/v1/fine_tuning/jobs`: create with OpenAI and marketplace fields, list with paging, lifecycle, events."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.conftest import Caller


def _error(response) -> dict:  # type: ignore[no-untyped-def]
    assert 400 <= response.status_code < 500, response.text
    return response.json()["error"]


def test_create_with_openai_and_marketplace_fields(create_job, training_file: str, client: TestClient,  # type: ignore[no-untyped-def]
                                                   customer: Caller) -> None:
    response = create_job(
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
        suffix="support-bot", seed=7, metadata={"team": "ml"},
        lora={"r": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
        max_price_per_gpu_hour=0.35, max_cost="2.5", min_vram_gb=12, gpu_filter=["RTX 4090", "RTX 3090"],
        trusted_hosts_only=True,
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    # OpenAI's first status: the job-time checks run just after the answer, then the job is queued.
    assert job["status"] == "validating_files" and job["model"] == "tunegrid/tiny-llama"
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=customer.headers).json()["status"] == "queued"
    assert job["training_file"] == training_file and job["validation_file"] is None
    assert job["hyperparameters"] == {"batch_size": 4, "learning_rate_multiplier": "auto", "n_epochs": 2}
    assert job["method"]["supervised"]["hyperparameters"] == job["hyperparameters"]
    assert job["lora"] == {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    assert job["max_price_per_gpu_hour"] == "0.350000" and job["max_cost"] == "2.500000"
    assert job["min_vram_gb"] == 12 and job["gpu_filter"] == ["RTX 4090", "RTX 3090"]
    assert job["trusted_hosts_only"] is True and job["seed"] == 7 and job["metadata"] == {"team": "ml"}
    assert job["estimated_tokens"] > 0 and job["fine_tuned_model"] is None and job["finished_at"] is None


def test_defaults(create_job) -> None:  # type: ignore[no-untyped-def]
    job = create_job(hyperparameters={"n_epochs": "auto"}).json()
    assert job["hyperparameters"]["n_epochs"] == 3
    assert job["lora"] == {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
    assert 0 <= job["seed"] < 2**31 and job["trusted_hosts_only"] is False


def test_model_can_be_named_by_hugging_face_repo(create_job) -> None:  # type: ignore[no-untyped-def]
    assert create_job(model="Qwen/Qwen2.5-0.5B-Instruct").json()["model"] == "qwen2.5-0.5b-instruct"


BAD = {
    "unknown model": ({"model": "gpt-9"}, "model", "model_not_available"),
    "missing file": ({"training_file": "file-nope"}, "training_file", "file_not_found"),
    "missing validation file": ({"validation_file": "file-nope"}, "validation_file", "file_not_found"),
    "dpo on chat data": ({"method": {"type": "dpo"}}, "training_file", "invalid_file_format"),
    "reinforcement": ({"method": {"type": "reinforcement"}}, "method.type", "unsupported_method"),
    "settings of another method": ({"method": {"type": "supervised", "dpo": {}}}, "method", "invalid_value"),
    "beta out of range": ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 3}}}},
                          "method.dpo.hyperparameters.beta", "invalid_value"),
    "unknown fine-tune": ({"model": "ft:tunegrid/tiny-llama:acct:x:ftjob-nope"}, "model", "model_not_found"),
    "unknown checkpoint": ({"model": "ft:tunegrid/tiny-llama:acct::ftjob-nope:ckpt-step-3"}, "model",
                           "model_not_found"),
    "early stopping without validation": ({"early_stopping": {"patience": 2}}, "early_stopping",
                                          "early_stopping_needs_validation"),
    "early stopping patience zero": ({"early_stopping": {"patience": 0}}, "early_stopping.patience", "invalid_value"),
    "epochs too high": ({"hyperparameters": {"n_epochs": 51}}, "hyperparameters.n_epochs", "invalid_value"),
    "batch size zero": ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size", "invalid_value"),
    "both hyperparameter places": (
        {"hyperparameters": {"n_epochs": 1}, "method": {"type": "supervised", "supervised": {"hyperparameters": {}}}},
        None, "invalid_value"),
    "lora rank": ({"lora": {"r": 0}}, "lora.r", "invalid_value"),
    "lora module name": ({"lora": {"target_modules": ["q_proj; rm -rf"]}}, "lora.target_modules.0", "invalid_value"),
    "negative price": ({"max_price_per_gpu_hour": -1}, "max_price_per_gpu_hour", "invalid_value"),
    "sub-micro price": ({"max_cost": "0.0000001"}, "max_cost", "invalid_value"),
    "empty gpu filter": ({"gpu_filter": []}, "gpu_filter", "invalid_value"),
    "suffix too long": ({"suffix": "x" * 65}, "suffix", "invalid_value"),
    "too much metadata": ({"metadata": {str(i): "v" for i in range(17)}}, "metadata", "invalid_value"),
    "unknown field": ({"max_cost_usd": 3}, "max_cost_usd", "unknown_parameter"),
    "integration without settings": ({"integrations": [{"type": "wandb"}]}, "integrations.0.wandb",
                                     "missing_required_parameter"),
    "missing model": ({"model": None}, "model", "invalid_value"),
    "wrong type": ({"trusted_hosts_only": "maybe"}, "trusted_hosts_only", "invalid_value"),
    "unknown verification": ({"verification": "twice"}, "verification", "invalid_value"),
    "redundant on a small file": ({"verification": "redundant"}, "verification", "too_few_examples_to_compare"),
}


@pytest.mark.parametrize("fields,param,code", BAD.values(), ids=list(BAD))
def test_bad_create_is_a_400_naming_the_parameter(create_job, fields, param, code) -> None:  # type: ignore[no-untyped-def]
    error = _error(create_job(**fields))
    assert error["type"] == "invalid_request_error" and error["code"] == code
    if param is not None:
        assert error["param"] == param


def test_missing_required_field_and_malformed_json(client: TestClient, customer: Caller) -> None:
    missing = client.post("/v1/fine_tuning/jobs", headers=customer.headers, json={"model": "tunegrid/tiny-llama"})
    assert _error(missing) == {"message": "Missing required parameter: 'training_file'.", "type": "invalid_request_error",
                               "param": "training_file", "code": "missing_required_parameter"}
    broken = client.post("/v1/fine_tuning/jobs", headers={**customer.headers, "content-type": "application/json"},
                         content=b'{"model": ')
    assert _error(broken)["code"] == "invalid_json"


def test_someone_elses_training_file_cannot_be_used(create_job, other_customer: Caller) -> None:  # type: ignore[no-untyped-def]
    assert _error(create_job(caller=other_customer))["code"] == "file_not_found"


def test_list_pages_with_cursor_and_filters_metadata(create_job, client: TestClient, customer: Caller,
                                                      other_customer: Caller) -> None:  # type: ignore[no-untyped-def]
    ids = [create_job(metadata={"n": str(i % 2)}).json()["id"] for i in range(5)]
    page = client.get("/v1/fine_tuning/jobs?limit=2", headers=customer.headers).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"] is True
    seen = [j["id"] for j in page["data"]]
    while page["has_more"]:
        page = client.get(f"/v1/fine_tuning/jobs?limit=2&after={seen[-1]}", headers=customer.headers).json()
        seen += [j["id"] for j in page["data"]]
    assert seen == ids[::-1]
    odd = client.get("/v1/fine_tuning/jobs?metadata[n]=1", headers=customer.headers).json()
    assert [j["id"] for j in odd["data"]] == [ids[3], ids[1]]
    assert client.get("/v1/fine_tuning/jobs", headers=other_customer.headers).json()["data"] == []
    assert client.get("/v1/fine_tuning/jobs?limit=0", headers=customer.headers).status_code == 400


def test_metadata_keys_with_quotes_and_path_characters_filter_exactly(create_job, client: TestClient,
                                                                      customer: Caller) -> None:  # type: ignore[no-untyped-def]
    """Keys are data: a quote, a dot or a `$` in one is matched literally (SQLite once answered 500 to `k"`)."""
    odd_keys = ['k"', "a.b", "$[0]", "x'y"]
    tagged = create_job(metadata={key: "v" for key in odd_keys}).json()["id"]
    create_job(metadata={"a": "v"})
    for key in odd_keys:
        found = client.get("/v1/fine_tuning/jobs", params={f"metadata[{key}]": "v"}, headers=customer.headers)
        assert found.status_code == 200, found.text
        assert [j["id"] for j in found.json()["data"]] == [tagged], key
    assert client.get("/v1/fine_tuning/jobs", params={'metadata[k"]': "w"}, headers=customer.headers).json()["data"] == []
    assert client.get("/v1/fine_tuning/jobs?limit=abc", headers=customer.headers).status_code == 400


def test_lifecycle_pause_resume_cancel_each_write_events(create_job, client: TestClient, customer: Caller) -> None:  # type: ignore[no-untyped-def]
    job_id = create_job().json()["id"]
    url = f"/v1/fine_tuning/jobs/{job_id}"
    assert client.post(f"{url}/resume", headers=customer.headers).status_code == 400  # not paused (OpenAI's 400)
    assert client.post(f"{url}/pause", headers=customer.headers).json()["status"] == "paused"
    assert client.post(f"{url}/pause", headers=customer.headers).json()["status"] == "paused"  # idempotent
    assert client.post(f"{url}/resume", headers=customer.headers).json()["status"] == "queued"
    cancelled = client.post(f"{url}/cancel", headers=customer.headers).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert client.post(f"{url}/cancel", headers=customer.headers).json()["status"] == "cancelled"  # idempotent
    refused = client.post(f"{url}/pause", headers=customer.headers)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_job_state"
    assert refused.json()["error"]["type"] == "invalid_request_error"

    events = client.get(f"{url}/events?limit=100", headers=customer.headers).json()
    statuses = [e["data"].get("status") for e in events["data"] if e["data"].get("status")]
    assert statuses == ["cancelled", "queued", "paused", "queued", "validating_files"]  # newest first
    assert all(e["object"] == "fine_tuning.job.event" and e["level"] == "info" for e in events["data"])
    two = client.get(f"{url}/events?limit=2", headers=customer.headers).json()
    more = client.get(f"{url}/events?limit=100&after={two['data'][-1]['id']}", headers=customer.headers).json()
    assert two["has_more"] and [e["id"] for e in two["data"] + more["data"]] == [e["id"] for e in events["data"]]


def test_checkpoints_list_is_empty_until_training(create_job, client: TestClient, customer: Caller) -> None:  # type: ignore[no-untyped-def]
    job_id = create_job().json()["id"]
    page = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=customer.headers).json()
    assert page == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}


def test_someone_elses_job_is_a_404_everywhere(create_job, client: TestClient, other_customer: Caller) -> None:  # type: ignore[no-untyped-def]
    job_id = create_job().json()["id"]
    for method, suffix in [("get", ""), ("post", "/cancel"), ("post", "/pause"), ("post", "/resume"),
                           ("get", "/events"), ("get", "/checkpoints")]:
        response = client.request(method, f"/v1/fine_tuning/jobs/{job_id}{suffix}", headers=other_customer.headers)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"

"""`POST /v1/fine_tuning/quotes`: estimates per GPU class and the offers of the workers idle now."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.fakes import FakeAgent, gpu


def quote(client: TestClient, customer, **body):  # type: ignore[no-untyped-def]
    return client.post("/v1/fine_tuning/quotes", headers=customer.headers, json=body)


def test_quote_from_a_training_file_with_no_workers(client: TestClient, customer, training_file: str) -> None:  # type: ignore[no-untyped-def]
    response = quote(client, customer, model="tunegrid/tiny-llama", training_file=training_file,
                     hyperparameters={"n_epochs": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "fine_tuning.quote" and body["n_epochs"] == 2 and body["estimated_tokens"] > 0
    assert body["workers_available"] == 0 and body["cheapest"] is None and body["fastest"] is None
    classes = {row["gpu_class"]: row for row in body["gpu_classes"]}
    assert classes["cpu"]["fits"] and classes["rtx-4090"]["estimated_tokens_per_s"] > classes["rtx-3060"]["estimated_tokens_per_s"]
    assert classes["rtx-4090"]["price_per_gpu_hour_min"] is None and body["trainings"] == 1
    twice = quote(client, customer, model="tunegrid/tiny-llama", training_file=training_file, verification="redundant")
    assert twice.status_code == 200 and twice.json()["trainings"] == 2


def test_quote_offers_the_cheapest_and_the_fastest_idle_worker(client: TestClient, customer, make_caller) -> None:  # type: ignore[no-untyped-def]
    provider = make_caller("provider", "pat")
    cheap = FakeAgent.register(client, provider.key, machine_id="cheap", price="0.10",
                               gpus=[gpu("NVIDIA GeForce RTX 3060", 12, "8.6")])
    fast = FakeAgent.register(client, provider.key, machine_id="fast", price="0.60")
    small = FakeAgent.register(client, provider.key, machine_id="small", price="0.05",
                               gpus=[gpu("NVIDIA GeForce RTX 3070", 8, "8.6")])
    for agent in (cheap, fast, small):
        assert agent.claim() is None  # idle and long-polling: placeable now
    body = quote(client, customer, model="llama-3.1-8b-instruct", training_tokens=2_000_000,
                 hyperparameters={"n_epochs": 1}).json()
    assert body["workers_available"] == 2  # the 8 GB card cannot hold an 8B model
    assert body["cheapest"]["worker_id"] == cheap.worker_id and body["fastest"]["worker_id"] == fast.worker_id
    assert body["cheapest"]["price_per_gpu_hour"] == "0.120000"  # ask plus the 20% fee
    assert 7.5 < body["estimated_memory_gb"] < 12
    rows = {row["gpu_class"]: row for row in body["gpu_classes"]}
    assert rows["rtx-4090"]["workers_available"] == 1 and rows["rtx-4090"]["price_per_gpu_hour_min"] == "0.720000"
    assert "cpu" not in rows
    capped = quote(client, customer, model="llama-3.1-8b-instruct", training_tokens=2_000_000,
                   max_price_per_gpu_hour="0.50").json()
    assert capped["workers_available"] == 1 and capped["fastest"]["worker_id"] == cheap.worker_id


def test_quote_needs_exactly_one_source_of_tokens(client: TestClient, customer, training_file: str) -> None:  # type: ignore[no-untyped-def]
    for body in ({"model": "tunegrid/tiny-llama"},
                 {"model": "tunegrid/tiny-llama", "training_file": training_file, "training_tokens": 5}):
        response = quote(client, customer, **body)
        assert response.status_code == 400 and "training_file or training_tokens" in response.json()["error"]["message"]


def test_quote_errors_are_clear(client: TestClient, customer, other_customer) -> None:  # type: ignore[no-untyped-def]
    unknown = quote(client, customer, model="gpt-5", training_tokens=100)
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "model_not_available"
    missing = quote(client, customer, model="tunegrid/tiny-llama", training_file="file-nope")
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "training_file"
    assert client.post("/v1/fine_tuning/quotes", json={"model": "x", "training_tokens": 1}).status_code == 401

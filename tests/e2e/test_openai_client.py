"""The official `openai` Python client drives a live `tunegrid-coordinator serve` through the whole customer flow."""

from __future__ import annotations

import io

import openai
import pytest
from openai import OpenAI

from tests.conftest import chat_lines, jsonl
from tests.e2e.conftest import LiveServer


def test_openai_client_full_flow(live_server: LiveServer) -> None:
    client = OpenAI(base_url=f"{live_server.url}/v1", api_key=live_server.new_key("customer", "alice"),
                    max_retries=0, timeout=30)
    content = jsonl(chat_lines(15))

    # Files
    uploaded = client.files.create(file=("train.jsonl", io.BytesIO(content)), purpose="fine-tune")
    assert uploaded.status == "processed" and uploaded.bytes == len(content)
    assert client.files.retrieve(uploaded.id).filename == "train.jsonl"
    validation = client.files.create(file=("valid.jsonl", io.BytesIO(jsonl(chat_lines(10)))), purpose="fine-tune")
    assert [f.id for f in client.files.list()] == [validation.id, uploaded.id]
    assert client.files.content(uploaded.id).read() == content

    # Jobs, with marketplace fields through extra_body
    job = client.fine_tuning.jobs.create(
        model="tunegrid/tiny-llama", training_file=uploaded.id, validation_file=validation.id, suffix="demo",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}, seed=42,
        metadata={"purpose": "e2e"},
        extra_body={"lora": {"r": 8, "alpha": 16}, "max_price_per_gpu_hour": "0.40", "max_cost": "3",
                    "min_vram_gb": 8, "gpu_filter": ["RTX 4090"], "trusted_hosts_only": False},
    )
    assert job.status == "validating_files" and job.seed == 42 and job.hyperparameters.n_epochs == 2
    assert job.model_extra["lora"] == {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"}
    assert job.model_extra["max_price_per_gpu_hour"] == "0.400000"
    assert client.fine_tuning.jobs.retrieve(job.id).validation_file == validation.id

    more = [client.fine_tuning.jobs.create(model="qwen2.5-0.5b-instruct", training_file=uploaded.id).id
            for _ in range(4)]
    first_page = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first_page.data] == more[::-1][:2] and first_page.has_next_page()
    assert [j.id for j in client.fine_tuning.jobs.list(limit=2)] == [*more[::-1], job.id]  # auto-paging

    events = client.fine_tuning.jobs.list_events(job.id, limit=10)
    assert [e.message for e in events.data][-1] == "Created fine-tuning job"
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []

    assert client.fine_tuning.jobs.pause(job.id).status == "paused"
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"

    models = [m.id for m in client.models.list()]
    assert "tunegrid/tiny-llama" in models and "mistral-7b-instruct-v0.3" in models

    # Errors arrive as the client's typed exceptions
    with pytest.raises(openai.BadRequestError, match="not available for fine-tuning"):
        client.fine_tuning.jobs.create(model="gpt-9", training_file=uploaded.id)
    with pytest.raises(openai.BadRequestError, match="Line 2 "):
        client.files.create(file=("bad.jsonl", io.BytesIO(content[:200] + b"\n{oops\n")), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-missing")
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{live_server.url}/v1", api_key="tg_wrong_key", max_retries=0).models.list()

    other = OpenAI(base_url=f"{live_server.url}/v1", api_key=live_server.new_key("customer", "bob"), max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(uploaded.id)
    assert other.fine_tuning.jobs.list().data == []

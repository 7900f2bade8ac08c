"""A customer's fine-tune as files they run anywhere, end to end with real processes: a job created through the
official `openai` client with `export: ["merged", "gguf:q8_0"]` trains and succeeds, its export runs as an export
lease on the real agent and trainer (the worker already holds the base), and the files download through
`/v1/files/{id}/content`: the merged model loads with `from_pretrained`, the GGUF file loads and generates in
llama.cpp, and the Modelfile names it. Then an export of one of the job's checkpoints, asked for afterwards."""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.conftest import chat_lines, jsonl
from tests.e2e.conftest import LiveServer, until
from tests.e2e.test_agent import registered_agent, worker_settings



@pytest.fixture
def live_env() -> dict[str, str]:
    return {"TUNEGRID_VERIFY_SHARE_BPS": "0", "TUNEGRID_CHECKPOINT_EVERY_STEPS": "2",
            "TUNEGRID_MAX_CHECKPOINTS_PER_JOB": "2"}


def _export(client: OpenAI, job_id: str, export_id: str) -> dict[str, Any]:
    return client.get(f"/fine_tuning/jobs/{job_id}/exports/{export_id}", cast_to=object)  # type: ignore[return-value]


@pytest.mark.live
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_job_exported_at_creation_and_a_checkpoint_afterwards(
    live_server: LiveServer, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    agent = registered_agent(live_server, worker_settings(tmp_path, tiny_model), monkeypatch)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    client = OpenAI(base_url=f"{live_server.url}/v1", api_key=live_server.new_key("customer", "alice"),
                    max_retries=0, timeout=60)
    try:
        data = client.files.create(file=("chat.jsonl", io.BytesIO(jsonl(chat_lines(16)))), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model="tunegrid/tiny-llama", training_file=data.id, suffix="exported",
            hyperparameters={"n_epochs": 2, "batch_size": 1}, extra_body={"export": ["gguf:q8_0", "merged"]})
        assert job.model_extra["export"] == ["merged", "gguf:q8_0"]
        job = until("the job", lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in (
            "succeeded", "failed", "cancelled") and j or None)
        assert job.status == "succeeded", job.error
        listed = until("its export", lambda: client.get(f"/fine_tuning/jobs/{job.id}/exports", cast_to=object)
                        ["data"] or None)  # type: ignore[index]
        export = until("the export to finish", lambda: (e := _export(client, job.id, listed[0]["id"]))["status"]
                        in ("succeeded", "failed", "cancelled") and e or None)
        assert export["status"] == "succeeded", export["error"]
        assert export["model"] == job.fine_tuned_model and float(export["cost"]) > 0
        files = {f["format"]: f for f in export["files"]}
        assert set(files) == {"merged", "gguf:q8_0", "modelfile:gguf:q8_0"}

        merged = tmp_path / "merged"
        archive = client.files.content(files["merged"]["file_id"]).read()
        assert len(archive) == files["merged"]["bytes"]
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(merged, filter="data")
        model = AutoModelForCausalLM.from_pretrained(merged)
        tokenizer = AutoTokenizer.from_pretrained(merged)
        assert tokenizer.chat_template and model.config.vocab_size == 640

        gguf = tmp_path / files["gguf:q8_0"]["filename"]
        gguf.write_bytes(client.files.content(files["gguf:q8_0"]["file_id"]).read())
        llm = llama_cpp.Llama(str(gguf), n_ctx=256, verbose=False)
        assert llm.create_completion("What is 2 plus 2?", max_tokens=4, temperature=0)["usage"]["completion_tokens"]
        modelfile = client.files.content(files["modelfile:gguf:q8_0"]["file_id"]).read().decode()
        assert f"FROM ./{gguf.name}\n" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile

        # Afterwards: a kept checkpoint of the same job, as Q4_K_M.
        checkpoint = next(c for c in client.fine_tuning.jobs.checkpoints.list(job.id).data
                          if c.model_extra["available"])
        asked = client.post(f"/fine_tuning/jobs/{job.id}/exports", cast_to=object,
                            body={"formats": ["gguf:q4_k_m"], "checkpoint": checkpoint.fine_tuned_model_checkpoint})
        assert asked["status"] == "queued" and float(asked["cost_held"]) > 0  # type: ignore[index]
        later = until("the checkpoint's export", lambda: (e := _export(client, job.id, asked["id"]))["status"]  # type: ignore[index]
                       in ("succeeded", "failed", "cancelled") and e or None)
        assert later["status"] == "succeeded", later["error"]
        assert later["model"] == checkpoint.fine_tuned_model_checkpoint
        assert [f["format"] for f in later["files"]] == ["gguf:q4_k_m", "modelfile:gguf:q4_k_m"]
        events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
        assert any(m.startswith(f"Export {asked['id']} completed") for m in events)  # type: ignore[index]
    finally:
        agent.stop()
        thread.join(timeout=30)

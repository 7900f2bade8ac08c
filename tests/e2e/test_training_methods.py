"""Every dataset an OpenAI customer brings, through the official `openai` client against a real coordinator
(PostgreSQL) and the real agent and trainer: a tool-calling SFT job, its checkpoints named after its fine-tuned
model, and a preference file trained with DPO continuing one of those checkpoints (SFT, then DPO) with early
stopping, its reward metrics in the events. Continuing from an `ft:` model by name:
tests/coordinator/services/test_continuation.py."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
from openai import OpenAI

from tests.conftest import jsonl, preference_lines, tool_chat_lines
from tests.e2e.conftest import LiveServer
from tests.e2e.test_agent import registered_agent, worker_settings

JOB_TIMEOUT_S = 240


@pytest.fixture
def live_env() -> dict[str, str]:
    # No verification lease (one provider here: tests/e2e/test_verification* covers it); checkpoints every 2 steps.
    return {"TUNEGRID_VERIFY_SHARE_BPS": "0", "TUNEGRID_CHECKPOINT_EVERY_STEPS": "2",
            "TUNEGRID_MAX_CHECKPOINTS_PER_JOB": "2"}


def _done(client: OpenAI, job_id: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} is still {job.status}")


@pytest.mark.live
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_tool_calling_sft_then_dpo_from_its_checkpoint_through_the_openai_client(
    live_server: LiveServer, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent = registered_agent(live_server, worker_settings(tmp_path, tiny_model), monkeypatch)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    client = OpenAI(base_url=f"{live_server.url}/v1", api_key=live_server.new_key("customer", "alice"),
                    max_retries=0, timeout=30)
    try:
        tools = client.files.create(file=("tools.jsonl", io.BytesIO(jsonl(tool_chat_lines(16)))), purpose="fine-tune")
        assert tools.model_extra["uses_tools"] is True
        sft = client.fine_tuning.jobs.create(
            model="tunegrid/tiny-llama", training_file=tools.id, suffix="tools",
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 1}}})
        sft = _done(client, sft.id)
        assert sft.status == "succeeded", sft.error
        assert sft.fine_tuned_model == f"ft:tunegrid/tiny-llama:{sft.organization_id}:tools:{sft.id}"
        assert sft.trained_tokens and sft.trained_tokens > 0 and sft.estimated_finish is None
        checkpoints = client.fine_tuning.jobs.checkpoints.list(sft.id).data
        assert checkpoints and all(c.fine_tuned_model_checkpoint == f"{sft.fine_tuned_model}:ckpt-step-{c.step_number}"
                                   for c in checkpoints)

        # A kept checkpoint of the first job (older ones are pruned), continued with DPO, stopping early.
        kept = [c for c in checkpoints if c.model_extra["available"]]
        assert kept and not checkpoints[-1].model_extra["available"]
        pairs = client.files.create(file=("pairs.jsonl", io.BytesIO(jsonl(preference_lines(16)))), purpose="fine-tune")
        assert pairs.model_extra["format"] == "preference"
        dpo = client.fine_tuning.jobs.create(
            model=kept[0].fine_tuned_model_checkpoint, training_file=pairs.id, validation_file=pairs.id,
            method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 2, "batch_size": 2,
                                                                  "learning_rate_multiplier": 20}}},
            extra_body={"early_stopping": {"patience": 1}})
        assert dpo.status == "validating_files" and dpo.method.type == "dpo"
        assert dpo.method.dpo.hyperparameters.beta == 0.1 and dpo.model == kept[0].fine_tuned_model_checkpoint
        assert dpo.model_extra["lora"] == sft.model_extra["lora"]
        dpo = _done(client, dpo.id)
        assert dpo.status == "succeeded", dpo.error
        assert dpo.fine_tuned_model.startswith("ft:tunegrid/tiny-llama:") and dpo.trained_tokens > 0
        events = client.fine_tuning.jobs.list_events(dpo.id, limit=500).data
        metrics = [e.data for e in events if e.type == "metrics" and "train_loss" in e.data]
        assert metrics and all({"reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward"} <= set(m)
                               for m in metrics)
        assert any(e.message.startswith(f"Continues from {kept[0].fine_tuned_model_checkpoint}") for e in events)
        stopping = dpo.model_extra["early_stopping"]
        assert stopping["patience"] == 1 and stopping["best_step"] >= 1 and stopping["reason"]
    finally:
        agent.stop()
        thread.join(timeout=30)

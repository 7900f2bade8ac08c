"""Every dataset an OpenAI customer brings, through the official `openai` client against a real coordinator
(PostgreSQL) and the real agent and trainer: a tool-calling SFT job, a preference file and a DPO job that
continues the first job (SFT, then DPO), its reward metrics in the events, checkpoints named after the job's
fine-tuned model, and a job continued from one of those checkpoints with early stopping."""

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
    return {"TUNEGRID_VERIFY_SHARE_BPS": "0", "TUNEGRID_CHECKPOINT_EVERY_STEPS": "2"}


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
def test_tools_dpo_after_sft_and_a_continued_checkpoint_through_the_openai_client(
    live_server: LiveServer, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent = registered_agent(live_server, worker_settings(tmp_path, tiny_model), monkeypatch)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    client = OpenAI(base_url=f"{live_server.url}/v1", api_key=live_server.new_key("customer", "alice"),
                    max_retries=0, timeout=30)
    try:
        tools = client.files.create(file=("tools.jsonl", io.BytesIO(jsonl(tool_chat_lines(24)))), purpose="fine-tune")
        assert tools.model_extra["uses_tools"] is True
        sft = client.fine_tuning.jobs.create(
            model="tunegrid/tiny-llama", training_file=tools.id, suffix="tools",
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 2}}})
        sft = _done(client, sft.id)
        assert sft.status == "succeeded", sft.error
        assert sft.fine_tuned_model == f"ft:tunegrid/tiny-llama:{sft.organization_id}:tools:{sft.id}"
        assert sft.trained_tokens and sft.trained_tokens > 0 and sft.estimated_finish is None
        checkpoints = client.fine_tuning.jobs.checkpoints.list(sft.id).data
        assert checkpoints and all(c.fine_tuned_model_checkpoint == f"{sft.fine_tuned_model}:ckpt-step-{c.step_number}"
                                   for c in checkpoints)

        pairs = client.files.create(file=("pairs.jsonl", io.BytesIO(jsonl(preference_lines(24)))), purpose="fine-tune")
        assert pairs.model_extra["format"] == "preference"
        dpo = client.fine_tuning.jobs.create(
            model=sft.fine_tuned_model, training_file=pairs.id,
            method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 2, "batch_size": 2,
                                                                  "learning_rate_multiplier": 20}}})
        assert dpo.method.type == "dpo" and dpo.method.dpo.hyperparameters.beta == 0.1
        assert dpo.model == sft.fine_tuned_model and dpo.model_extra["lora"] == sft.model_extra["lora"]
        dpo = _done(client, dpo.id)
        assert dpo.status == "succeeded", dpo.error
        metrics = [e.data for e in client.fine_tuning.jobs.list_events(dpo.id, limit=200).data if e.type == "metrics"]
        assert metrics and all({"reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward"} <= set(m)
                               for m in metrics if "train_loss" in m)
        events = [e.message for e in client.fine_tuning.jobs.list_events(dpo.id, limit=200).data]
        assert any(m.startswith(f"Continues from {sft.fine_tuned_model}") for m in events)

        # A job continued from a kept checkpoint of the first (older ones are pruned), stopping early.
        kept = [c for c in checkpoints if c.model_extra["available"]]
        assert kept and not checkpoints[-1].model_extra["available"]
        continued = client.fine_tuning.jobs.create(
            model=kept[0].fine_tuned_model_checkpoint, training_file=tools.id, validation_file=tools.id,
            hyperparameters={"n_epochs": 3, "batch_size": 2}, extra_body={"early_stopping": {"patience": 1}})
        continued = _done(client, continued.id)
        assert continued.status == "succeeded", continued.error
        stopping = continued.model_extra["early_stopping"]
        assert stopping["patience"] == 1 and stopping["best_step"] >= 2 and stopping["reason"]
    finally:
        agent.stop()
        thread.join(timeout=30)

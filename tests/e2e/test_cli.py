"""The customer CLI (`tunegrid`) against a live coordinator: upload, create with --watch to completion (a
protocol-level fake worker takes and finishes the job), show, events, list, download, quote, balance, and
errors as one clear line with exit 1."""

from __future__ import annotations

import json
import tarfile
import threading
from pathlib import Path

import httpx
import pytest

from client.cli import main as tunegrid
from tests.conftest import chat_lines, jsonl
from tests.e2e.conftest import LiveServer
from tests.fakes import FakeAgent


def fake_worker(server: LiveServer, provider_key: str, stop: threading.Event) -> threading.Thread:
    """Takes jobs as they come and finishes each honestly (progress, adapter, complete)."""
    def loop() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            agent = FakeAgent.register(http, provider_key)
            while not stop.is_set():
                assignment = agent.claim(wait_s=1)
                if assignment is not None:
                    agent.progress(assignment["lease_id"], step=1, loss=2.2, total_steps=2)
                    agent.finish(assignment["lease_id"])
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


@pytest.mark.live
@pytest.mark.parametrize("backend", ["sqlite"])
def test_upload_create_watch_download(live_server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TUNEGRID_API_URL", live_server.url)
    monkeypatch.setenv("TUNEGRID_API_KEY", live_server.new_key("customer", "alice"))
    stop = threading.Event()
    worker = fake_worker(live_server, live_server.new_key("provider", "pat"), stop)
    try:
        data = tmp_path / "train.jsonl"
        data.write_bytes(jsonl(chat_lines(20)))
        assert tunegrid(["--json", "files", "upload", str(data)]) == 0
        file_id = json.loads(capsys.readouterr().out)["id"]

        assert tunegrid(["--json", "quote", "--model", "tunegrid/tiny-llama", "--file", file_id]) == 0
        assert json.loads(capsys.readouterr().out)["estimated_tokens"] > 0

        assert tunegrid(["jobs", "create", "--model", "tunegrid/tiny-llama", "--file", file_id, "--epochs", "1",
                         "--max-cost", "1", "--watch"]) == 0
        out = capsys.readouterr().out
        assert "succeeded" in out and "tunegrid jobs download" in out
        job_id = out.split("tunegrid jobs download ")[1].split("`")[0].strip()

        assert tunegrid(["--json", "jobs", "show", job_id]) == 0
        assert json.loads(capsys.readouterr().out)["status"] == "succeeded"
        assert tunegrid(["jobs", "events", job_id]) == 0
        assert "successfully completed" in capsys.readouterr().out
        assert tunegrid(["jobs", "list"]) == 0
        assert job_id in capsys.readouterr().out
        target = tmp_path / "adapter.tar.gz"
        assert tunegrid(["jobs", "download", job_id, "--out", str(target)]) == 0
        assert "adapter saved to" in capsys.readouterr().out
        with tarfile.open(target) as tar:
            assert "adapter/adapter_config.json" in tar.getnames()
        assert tunegrid(["--json", "balance"]) == 0
        balance = json.loads(capsys.readouterr().out)
        assert balance["held"] == "0.000000" and float(balance["available"]) <= 100  # the job's hold came back

        assert tunegrid(["jobs", "show", "ftjob-missing"]) == 1
        assert "No such fine-tuning job" in capsys.readouterr().out
        monkeypatch.setenv("TUNEGRID_API_KEY", "")
        assert tunegrid(["balance"]) == 1
        assert "TUNEGRID_API_KEY" in capsys.readouterr().out
    finally:
        stop.set()
        worker.join(timeout=10)

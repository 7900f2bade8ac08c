"""`tunegrid` (the customer CLI) against the coordinator app in this process (its HTTP through Starlette's test
transport, on SQLite and PostgreSQL): upload, quote, create, show, list, events, cancel, balance, and errors
printed plainly (or as JSON) with exit code 1. The whole path with a worker and a download is tests/e2e/test_cli.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from client import cli
from client.api import Client
from tests.conftest import Caller, chat_lines, jsonl


@pytest.fixture
def tunegrid(client: TestClient, customer: Caller, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """Run the CLI with the customer's key; what it printed, parsed when it printed JSON."""
    monkeypatch.setenv("TUNEGRID_API_KEY", customer.key)

    def in_process(args) -> Client:  # type: ignore[no-untyped-def]
        api = Client("http://testserver", args.api_key)  # checks the key, as against a real URL
        api.http.close()
        api.http = client  # the app's own test transport, with this client's headers (open for the next command)
        api.close = lambda: None  # type: ignore[method-assign]
        client.headers.update({"Authorization": f"Bearer {args.api_key}", "User-Agent": "tunegrid-cli"})
        return api

    monkeypatch.setattr(cli, "_client", in_process)

    def run(*argv: str) -> tuple[int, str]:
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out + captured.err
    return run


def test_upload_quote_create_show_list_events_and_cancel(tunegrid, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "train.jsonl"
    data.write_bytes(jsonl(chat_lines(20)))
    code, out = tunegrid("--json", "files", "upload", str(data))
    assert code == 0
    file = json.loads(out)
    assert file["purpose"] == "fine-tune" and file["filename"] == "train.jsonl"

    code, out = tunegrid("--json", "quote", "--model", "tunegrid/tiny-llama", "--file", file["id"])
    assert code == 0 and json.loads(out)["estimated_tokens"] > 0
    code, out = tunegrid("quote", "--model", "tunegrid/tiny-llama", "--file", file["id"], "--verification", "redundant")
    assert code == 0 and "trained 2 times" in out

    code, out = tunegrid("--json", "jobs", "create", "--model", "tunegrid/tiny-llama", "--file", file["id"],
                         "--epochs", "1", "--max-cost", "1", "--verification", "redundant")
    assert code == 0
    job = json.loads(out)
    assert job["status"] in ("validating_files", "queued", "running") and job["training_file"] == file["id"]
    assert job["verification"]["mode"] == "redundant"

    code, out = tunegrid("jobs", "list")
    assert code == 0 and job["id"] in out
    code, out = tunegrid("--json", "jobs", "show", job["id"])
    assert code == 0 and json.loads(out)["id"] == job["id"]
    code, out = tunegrid("jobs", "cancel", job["id"])
    assert code == 0
    code, out = tunegrid("jobs", "events", job["id"])
    assert code == 0 and "cancelled" in out
    code, out = tunegrid("--json", "balance")
    assert code == 0 and json.loads(out)["held"] == "0.000000"  # the cancelled job's hold came back


def test_errors_are_printed_plainly_with_exit_code_1(tunegrid, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, out = tunegrid("jobs", "show", "ftjob-missing")
    assert code == 1 and "No such fine-tuning job" in out
    code, out = tunegrid("--json", "jobs", "show", "ftjob-missing")
    assert code == 1 and json.loads(out)["error"]["status"] == 404
    code, out = tunegrid("files", "upload", str(tmp_path / "nowhere.jsonl"))
    assert code == 1 and "No such file or directory" in out
    monkeypatch.setenv("TUNEGRID_API_KEY", "")
    code, out = tunegrid("balance")
    assert code == 1 and "TUNEGRID_API_KEY" in out

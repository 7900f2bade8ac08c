"""`tunegrid-worker doctor`: it tells a provider how to get the trainer image, and never calls the process runtime
safe for strangers' jobs. NVML and the coordinator are absent here: those checks fail, as they should."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker import cli
from worker.nvml import GpuProbe
from worker.settings import WorkerSettings


def test_doctor_says_how_to_get_the_image_and_that_the_process_runtime_is_no_sandbox(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli.DockerRuntime, "available", staticmethod(lambda image: False))
    settings = WorkerSettings(config_dir=tmp_path / "c", data_dir=tmp_path / "d", runtime="process",
                              image="tunegrid/trainer:missing")
    assert cli.doctor(settings, GpuProbe()) == 1
    out = capsys.readouterr().out
    assert "[FAIL] the trainer image tunegrid/trainer:missing is missing" in out
    assert "docker build -t tunegrid/trainer:missing -f worker/trainer/Dockerfile ." in out
    assert "[FAIL] runtime: process (process) is NOT safe for strangers' jobs" in out

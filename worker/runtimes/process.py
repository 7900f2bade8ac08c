"""The trainer as a subprocess of the agent's own Python (`python -m worker.trainer`): for CPU machines,
development and the demo. It needs the `trainer` extra installed next to the agent.

Not a sandbox: the trainer runs as the agent's user with the agent's view of the PC (its network, its files).
Only the Docker runtime keeps a stranger's job inside its folder; `tunegrid-worker doctor` says so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from worker.jobdir import create_private
from worker.runtimes.base import JobMount, Running, Runtime


class ProcessRunning(Running):
    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process

    def poll(self) -> int | None:
        return self._process.poll()

    def stop(self, grace_s: float) -> int:
        if self._process.poll() is None:
            if os.name == "nt":
                self._process.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
            else:
                self._process.terminate()  # SIGTERM: the trainer checkpoints and exits 5
            try:
                return self._process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self._process.wait()

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def pids(self) -> set[int]:
        return {self._process.pid}

    def handle(self) -> dict[str, Any]:
        return {"pid": self._process.pid}


class OrphanRunning(Running):
    """A trainer started by a previous run of the agent (its own session, so it outlived the agent). Not our
    child: its exit code is read from the last line it wrote to progress.jsonl."""

    def __init__(self, pid: int, job_dir: Path) -> None:
        self._pid, self._job_dir = pid, job_dir

    def _alive(self) -> bool:
        try:
            os.kill(self._pid, 0)
        except OSError:
            return False
        stat = Path(f"/proc/{self._pid}/stat")
        return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")

    def poll(self) -> int | None:
        if self._alive():
            return None
        lines = (self._job_dir / "out" / "progress.jsonl").read_text().splitlines() if (
            self._job_dir / "out" / "progress.jsonl").exists() else []
        last = json.loads(lines[-1]) if lines else {}
        return {"finished": 0, "preempted": 5}.get(last.get("type"), 3 if last.get("kind") == "user_error" else 4)

    def stop(self, grace_s: float) -> int:
        if self._alive():
            os.kill(self._pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while self._alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            self.kill()
        return self.poll() or 0

    def kill(self) -> None:
        if self._alive():
            os.kill(self._pid, signal.SIGKILL)
            while self._alive():
                time.sleep(0.05)

    def pids(self) -> set[int]:
        return {self._pid}

    def handle(self) -> dict[str, Any]:
        return {"pid": self._pid}


class ProcessRuntime(Runtime):
    name = "process"

    def model_dir_inside(self, mount: JobMount) -> str:
        return str(mount.model_dir)

    def reattach(self, handle: dict[str, Any], job_dir: Path) -> Running | None:
        pid = handle.get("pid")
        if os.name != "posix" or not isinstance(pid, int):
            return None
        cmdline = Path(f"/proc/{pid}/cmdline")
        # The pid must still be our trainer on this job, not a process that reused the number.
        if not cmdline.exists() or str(job_dir).encode() not in cmdline.read_bytes():
            return None
        running = OrphanRunning(pid, job_dir)
        return running if running.poll() is None else None

    def start(self, mount: JobMount) -> Running:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["CUDA_VISIBLE_DEVICES"] = "" if mount.gpu_index is None else str(mount.gpu_index)
        log = create_private(mount.log, append=True)  # never through a link the job planted
        flags: dict[str, object] = (
            {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt"  # type: ignore[attr-defined]
            else {"start_new_session": True}  # the owner's Ctrl-C on the agent does not reach the trainer directly
        )
        try:
            process = subprocess.Popen([sys.executable, "-m", "worker.trainer", "--job", str(mount.job_dir)],
                                       stdout=log, stderr=subprocess.STDOUT, env=env, **flags)  # type: ignore[call-overload]
        finally:
            log.close()
        return ProcessRunning(process)

"""The trainer as a subprocess of the agent's own Python (`python -m worker.trainer`): for CPU machines,
development and the demo. It needs the `trainer` extra installed next to the agent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

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


class ProcessRuntime(Runtime):
    name = "process"

    def model_dir_inside(self, mount: JobMount) -> str:
        return str(mount.model_dir)

    def start(self, mount: JobMount) -> Running:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["CUDA_VISIBLE_DEVICES"] = "" if mount.gpu_index is None else str(mount.gpu_index)
        log = (mount.job_dir / "trainer.log").open("ab")
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

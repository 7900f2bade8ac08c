"""The trainer in a Docker container: the trainer image, the job's GPU through `device_requests`, no
network, memory, CPU and pid limits, a read-only root filesystem, no capabilities, a non-root user, the
job directory read-write and the model read-only. SIGTERM on stop (the trainer checkpoints), SIGKILL after
the grace; the container is removed afterwards and its log kept in the job directory.

Works wherever the docker SDK reaches an engine: Linux, and Windows through Docker Desktop (WSL2 GPU support).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from worker.runtimes.base import JobMount, Running, Runtime

log = logging.getLogger(__name__)
JOB, MODEL = "/job", "/model"
# The only writable place besides the job: a tmpfs of its own (not /tmp, which bind mounts may sit under).
SCRATCH = "/scratch"
NOBODY = "65534:65534"  # for images without a user of their own


class DockerRunning(Running):
    def __init__(self, container: Any, job_dir: Path) -> None:
        self._container = container
        self._job_dir = job_dir
        self._code: int | None = None

    def poll(self) -> int | None:
        if self._code is None:
            self._container.reload()
            if self._container.status in ("exited", "dead"):
                self._code = int(self._container.attrs["State"]["ExitCode"])
                self._remove()
        return self._code

    def stop(self, grace_s: float) -> int:
        if self.poll() is None:
            self._container.stop(timeout=int(max(grace_s, 1)))  # SIGTERM, then SIGKILL after the grace
            self._code = int(self._container.wait(timeout=grace_s + 30)["StatusCode"])
            self._remove()
        return self._code  # type: ignore[return-value]

    def kill(self) -> None:
        if self.poll() is None:
            self._container.kill()
            self._code = int(self._container.wait(timeout=60)["StatusCode"])
            self._remove()

    def pids(self) -> set[int]:
        try:
            top = self._container.top()
            column = top["Titles"].index("PID")
            return {int(row[column]) for row in top["Processes"]}
        except Exception:  # noqa: BLE001 - an exited container has no processes
            return set()

    def handle(self) -> dict[str, Any]:
        return {"container": self._container.id}

    def _remove(self) -> None:
        try:
            (self._job_dir / "trainer.log").write_bytes(self._container.logs(stdout=True, stderr=True))
            self._container.remove(force=True)
        except Exception as exc:  # noqa: BLE001 - a leftover container is the engine's to clean, not a failure
            log.warning("container %s not removed: %s", self._container.id[:12], exc)


class DockerRuntime(Runtime):
    name = "docker"

    def __init__(
        self, *, image: str, client: Any | None = None, memory_bytes: int = 16 * 1024**3, cpus: float = 4.0,
        pids_limit: int = 512, user: str | None = None, command: list[str] | None = None,
        extra_volumes: dict[str, dict[str, str]] | None = None, working_dir: str | None = None,
    ) -> None:
        if client is None:
            import docker  # noqa: PLC0415 - only where Docker is the chosen runtime

            client = docker.from_env(timeout=30)
        self.client, self.image = client, image
        self.memory_bytes, self.cpus, self.pids_limit, self.user = memory_bytes, cpus, pids_limit, user
        # The trainer image's entrypoint is `python -m worker.trainer` and its user non-root (uid 10001);
        # `user` and `command` override them for other images.
        self.command = command or ["--job", JOB]
        self.extra_volumes, self.working_dir = extra_volumes or {}, working_dir

    @staticmethod
    def available(image: str) -> bool:
        """An engine answers and holds the trainer image (no registry is assumed reachable)."""
        try:
            import docker  # noqa: PLC0415

            docker.from_env(timeout=5).images.get(image)
            return True
        except Exception:  # noqa: BLE001
            return False

    def model_dir_inside(self, mount: JobMount) -> str:
        return MODEL

    def reattach(self, handle: dict[str, Any], job_dir: Path) -> Running | None:
        try:
            container = self.client.containers.get(handle["container"])
        except Exception:  # noqa: BLE001 - gone (removed, or the engine restarted without it)
            return None
        if container.labels.get("tunegrid.job_dir") != str(job_dir):
            return None
        return DockerRunning(container, job_dir)

    def start(self, mount: JobMount) -> Running:
        from docker.types import DeviceRequest  # noqa: PLC0415

        _open_to_the_container(mount.job_dir, writable=True)  # the container's user is not the agent's
        _open_to_the_container(mount.model_dir, writable=False)  # libraries save weights 0600
        devices = ([DeviceRequest(device_ids=[str(mount.gpu_index)], capabilities=[["gpu"]])]
                   if mount.gpu_index is not None else [])
        container = self.client.containers.run(
            self.image, self.command, detach=True, network_mode="none", mem_limit=self.memory_bytes,
            memswap_limit=self.memory_bytes, nano_cpus=int(self.cpus * 1e9), pids_limit=self.pids_limit,
            user=self.user or "", read_only=True, tmpfs={SCRATCH: "size=1g,mode=1777"}, cap_drop=["ALL"],
            security_opt=["no-new-privileges"], device_requests=devices,
            environment={"PYTHONUNBUFFERED": "1", "HOME": SCRATCH, "TMPDIR": SCRATCH, "HF_HUB_OFFLINE": "1"},
            volumes={str(mount.job_dir): {"bind": JOB, "mode": "rw"}, str(mount.model_dir): {"bind": MODEL, "mode": "ro"},
                     **self.extra_volumes},
            working_dir=self.working_dir, labels={"tunegrid.job_dir": str(mount.job_dir)},
        )
        return DockerRunning(container, mount.job_dir)


def _open_to_the_container(folder: Path, *, writable: bool) -> None:
    if os.name != "posix":
        return  # Docker Desktop maps Windows folders with the user's rights
    dir_mode, file_mode = (0o777, 0o666) if writable else (0o755, 0o644)
    for root, _, files in os.walk(folder):
        os.chmod(root, os.stat(root).st_mode & 0o7777 | dir_mode)
        for name in files:
            path = Path(root) / name
            os.chmod(path, os.stat(path).st_mode & 0o7777 | file_mode)

"""The trainer in a Docker container: the trainer image, the job's GPU through `device_requests`, no
network, memory, CPU and pid limits, a read-only root filesystem, no capabilities, a non-root user, the
job directory read-write and the model read-only. SIGTERM on stop (the trainer checkpoints), SIGKILL after
the grace; the container is removed afterwards and its log kept beside the job directory (`mount.log`), where
the container cannot plant a link for the agent to write through.

The job directory is the container user's alone (0700): a non-root agent runs the container as its own user; a
root agent runs it as the image's user (10001, or `user`) and hands the folder to that user. Other local users
of the PC never read the customer's data.

Works wherever the docker SDK reaches an engine: Linux, and Windows through Docker Desktop (WSL2 GPU support).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from worker.jobdir import create_private
from worker.runtimes.base import JobMount, Running, Runtime

log = logging.getLogger(__name__)
JOB, MODEL = "/job", "/model"
# The only writable place besides the job: a tmpfs of its own (not /tmp, which bind mounts may sit under).
SCRATCH = "/scratch"
NOBODY = "65534:65534"  # for images without a user of their own
TRAINER_USER = "10001:10001"  # the trainer image's user (worker/trainer/Dockerfile)


class DockerRunning(Running):
    def __init__(self, container: Any, log: Path) -> None:
        self._container = container
        self._log = log
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
            with create_private(self._log, truncate=True) as log_file:
                log_file.write(self._container.logs(stdout=True, stderr=True))
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
        return DockerRunning(container, JobMount(job_dir=job_dir, model_dir=job_dir, gpu_index=None).log)

    def start(self, mount: JobMount) -> Running:
        from docker.types import DeviceRequest  # noqa: PLC0415

        user = self.user or container_user()
        hand_over(mount.job_dir, user)
        if _is_root():
            _readable_by_all(mount.model_dir)  # public base weights; libraries save them 0600
        devices = ([DeviceRequest(device_ids=[str(mount.gpu_index)], capabilities=[["gpu"]])]
                   if mount.gpu_index is not None else [])
        container = self.client.containers.run(
            self.image, self.command, detach=True, network_mode="none", mem_limit=self.memory_bytes,
            memswap_limit=self.memory_bytes, nano_cpus=int(self.cpus * 1e9), pids_limit=self.pids_limit,
            user=user, read_only=True, tmpfs={SCRATCH: "size=1g,mode=1777"}, cap_drop=["ALL"],
            security_opt=["no-new-privileges"], device_requests=devices,
            # As many torch threads as CPUs the container may use: more only spin against the quota.
            environment={"PYTHONUNBUFFERED": "1", "HOME": SCRATCH, "TMPDIR": SCRATCH, "HF_HUB_OFFLINE": "1",
                         "OMP_NUM_THREADS": str(max(1, int(self.cpus)))},
            volumes={str(mount.job_dir): {"bind": JOB, "mode": "rw"}, str(mount.model_dir): {"bind": MODEL, "mode": "ro"},
                     **self.extra_volumes},
            working_dir=self.working_dir, labels={"tunegrid.job_dir": str(mount.job_dir)},
        )
        return DockerRunning(container, mount.log)


def _is_root() -> bool:
    return os.name == "posix" and os.geteuid() == 0


def container_user() -> str:
    """Who the trainer runs as: the agent's own user, or, for a root agent, the trainer image's (never root)."""
    if os.name != "posix" or _is_root():
        return TRAINER_USER
    return f"{os.getuid()}:{os.getgid()}"


def hand_over(folder: Path, user: str) -> None:
    """The job folder for the container's user only: owned by it (a root agent chowns), 0700 folders, 0600
    files. Links are never followed (the folder holds only what the agent wrote before the start)."""
    if os.name != "posix":
        return  # Docker Desktop maps Windows folders with the user's rights
    uid, _, gid = user.partition(":")
    owner = (int(uid), int(gid or uid)) if uid.isdigit() and (gid or uid).isdigit() else None
    if owner is None:
        raise ValueError(f"the container user must be numeric uid:gid, not {user!r}")
    if not _is_root() and owner != (os.getuid(), os.getgid()):
        raise PermissionError(f"a non-root agent runs containers as itself ({os.getuid()}:{os.getgid()}), not {user}")
    for root, dirs, files in os.walk(folder):  # never descends into a linked folder
        entries = [(Path(root), 0o700)] + [(Path(root) / d, 0o700) for d in dirs] + [(Path(root) / f, 0o600) for f in files]
        for path, mode in entries:
            if path.is_symlink():
                raise PermissionError(f"{path} is a link; the job folder holds none before the trainer starts")
            if _is_root():
                os.chown(path, *owner, follow_symlinks=False)
            os.chmod(path, mode)


def _readable_by_all(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        os.chmod(root, os.stat(root).st_mode & 0o7777 | 0o755)
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                os.chmod(path, os.stat(path).st_mode & 0o7777 | 0o644)

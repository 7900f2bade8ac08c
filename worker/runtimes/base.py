"""The interface every runtime implements: start the trainer on a job directory, watch it, stop it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class JobMount:
    """What a trainer sees: its job directory (read-write: the job folder's `work/` side) and the model it
    trains (read-only)."""

    job_dir: Path
    model_dir: Path
    gpu_index: int | None  # None: train on the CPU

    @property
    def log(self) -> Path:
        """Where the runtime keeps the trainer's output: beside the job directory, outside what it can write."""
        return self.job_dir.with_name(f"{self.job_dir.name}.log")


class Running(ABC):
    """A started trainer."""

    @abstractmethod
    def poll(self) -> int | None:
        """The exit code once it has ended, else None."""

    @abstractmethod
    def stop(self, grace_s: float) -> int:
        """Ask it to stop (SIGTERM: the trainer checkpoints first), kill it after `grace_s`; its exit code."""

    @abstractmethod
    def kill(self) -> None:
        """End it now (a cancel or a lost lease: its work is not wanted)."""

    @abstractmethod
    def pids(self) -> set[int]:
        """Its process ids as the host (and NVML) sees them: our own use of the GPU, not the owner's."""

    def handle(self) -> dict[str, Any]:
        """What a restarted agent needs to find this trainer again (kept in state.json)."""
        return {}


class Runtime(ABC):
    name: str

    @abstractmethod
    def start(self, mount: JobMount) -> Running:
        """Start the trainer; `mount.job_dir/spec.json` has `model_dir` as this runtime's trainer will see it."""

    @abstractmethod
    def model_dir_inside(self, mount: JobMount) -> str:
        """The model directory as the trainer sees it (the spec's `model_dir`)."""

    def reattach(self, handle: dict[str, Any], job_dir: Path) -> Running | None:
        """The trainer a previous run of the agent started, if it still runs; None otherwise."""
        return None

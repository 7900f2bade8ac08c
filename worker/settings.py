"""The agent's settings: one pydantic-settings class, environment prefix `TUNEGRID_WORKER_`.

Paths come from `platformdirs`, so the same code finds the right folders on Linux and on Windows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

APP = "tunegrid"


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEGRID_WORKER_", extra="ignore")

    config_dir: Path = Field(default_factory=lambda: Path(platformdirs.user_config_dir(APP)),
                             description="credentials.json (mode 0600) and policy.json")
    data_dir: Path = Field(default_factory=lambda: Path(platformdirs.user_data_dir(APP)) / "worker",
                           description="job directories, the model cache and the agent's state")
    runtime: Literal["auto", "docker", "process"] = Field(
        default="auto", description="auto: Docker when an engine answers, else the trainer as a subprocess")
    image: str = Field(default="tunegrid/trainer:latest", description="the trainer image for the Docker runtime")
    claim_wait_s: float = Field(default=25.0, ge=0, le=30)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0, description="per request; long-polls add their wait")
    max_attempts: int = Field(default=6, ge=1, le=50, description="tries per call before it is left for later")
    backoff_base_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    stop_grace_s: float = Field(default=20.0, gt=0, description="SIGTERM to kill, for the trainer to checkpoint")
    progress_poll_s: float = Field(default=0.5, gt=0, description="how often a running job's progress is read")
    events_flush_s: float = Field(default=2.0, gt=0, description="how often buffered events are sent")
    max_adapter_bytes: int = Field(default=2 * 1024**3, gt=0, description="the largest adapter the agent sends")
    max_export_bytes: int = Field(default=64 * 1024**3, gt=0, description="the largest file of an export it sends")

    @property
    def credentials_path(self) -> Path:
        return self.config_dir / "credentials.json"

    @property
    def policy_path(self) -> Path:
        return self.config_dir / "policy.json"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def model_cache(self) -> Path:
        return self.data_dir / "models"

    @property
    def state_path(self) -> Path:
        return self.data_dir / "state.json"

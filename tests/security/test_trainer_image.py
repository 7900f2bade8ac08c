"""The real sandbox: a job trains end to end in the real trainer image (worker/trainer/Dockerfile, built offline
here on a debootstrap base with the CPU torch wheel) through the agent's Docker runtime: no network, a
read-only root, a non-root user, limits, and a job folder that is the container user's alone."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import LiveServer
from tests.e2e.test_agent import registered_agent, run_until_done, submit, worker_settings
from tests.security.conftest import docker_runtime

pytestmark = pytest.mark.live


def test_a_real_job_trains_in_the_real_trainer_image(
    coordinator: LiveServer, trainer_image: str, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = worker_settings(tmp_path / "agent", tiny_model)
    agent = registered_agent(coordinator, settings, monkeypatch)
    agent.runtime = docker_runtime(trainer_image)
    seen: dict = {}  # type: ignore[type-arg]
    start = agent.runtime.start

    def watched(mount):  # type: ignore[no-untyped-def]
        running = start(mount)
        running._container.reload()  # noqa: SLF001 - the container as the engine runs it
        seen.update(host=running._container.attrs["HostConfig"], user=running._container.attrs["Config"]["User"],  # noqa: SLF001
                    mode=mount.job_dir.stat().st_mode & 0o777, uid=mount.job_dir.stat().st_uid)
        return running

    agent.runtime.start = watched  # type: ignore[method-assign]
    customer = coordinator.new_key("customer", "dana")
    with httpx.Client(base_url=coordinator.url, headers={"Authorization": f"Bearer {customer}"}, timeout=30) as client:
        job = submit(client, examples=24, hyperparameters={"n_epochs": 2, "batch_size": 2}, lora={"r": 8})
        done = run_until_done(agent, client, job["id"])
        assert done["status"] == "succeeded", done
        archive = client.get(f"/v1/files/{done['result_files'][0]}/content")
        with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
            assert "adapter/adapter_model.safetensors" in tar.getnames()
    host = seen["host"]
    assert host["NetworkMode"] == "none" and host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
    assert host["Memory"] == 3 * 1024**3 and host["PidsLimit"] == 512
    assert seen["user"] == "10001:10001" and seen["mode"] == 0o700 and seen["uid"] == 10001
